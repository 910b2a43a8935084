# The package built and tested inside a container, as its users' CI runs it.
#
#   docker build -t userfaultfd-test .
#   docker run --rm --device /dev/userfaultfd userfaultfd-test            # least privilege
#   docker run --rm --cap-add SYS_PTRACE --security-opt seccomp=unconfined userfaultfd-test
#
# userfaultfd needs run-time permissions that `docker build` cannot have, so the image only builds
# (npm ci, then the addon from source with node-gyp, then the TypeScript) and the suite runs at
# `docker run` time (scripts/docker/run-suite.sh: a fast permission check, then vitest).
#
# NODE_IMAGE: any Debian-based Node image with g++, make and python3 (the official node images
# have them); `npm run test:docker` builds a local stand-in when the official one cannot be pulled.
# Behind a TLS-intercepting proxy pass its CA bundle as a BuildKit secret:
#   docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt ...
ARG NODE_IMAGE=node:20-bookworm
FROM ${NODE_IMAGE}

# node-gyp builds against the image's own Node headers (official images: /usr/local/include/node),
# never downloads them.
ENV npm_config_nodedir=/usr/local \
    npm_config_update_notifier=false \
    npm_config_fund=false \
    npm_config_audit=false \
    CI=1
WORKDIR /usr/src/userfaultfd

# Dependencies first (a layer reused while package*.json do not change).
COPY package.json package-lock.json ./
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then \
      export NODE_EXTRA_CA_CERTS=/run/secrets/ca_bundle npm_config_cafile=/run/secrets/ca_bundle; \
    fi; \
    npm ci --ignore-scripts

COPY . .
# Always compile here: the suite must test these sources, not a prebuilt binary.
RUN npm run build && node -e "require('./dist/addon/native')" \
    && chmod +x scripts/docker/run-suite.sh

CMD ["scripts/docker/run-suite.sh"]
