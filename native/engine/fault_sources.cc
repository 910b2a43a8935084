#include "engine/fault_sources.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include "engine/util.h"
#include "kernel/uapi.h"

namespace {

// The fill ioctls write bytes done (or -errno) into a SIGNED trailing field; partial progress is
// EAGAIN with a positive count, "event pending" is EAGAIN with -EAGAIN.
FillResult Outcome(int rc, int64_t out, uint64_t len, const char* syscall) {
  FillResult r;
  r.syscall = syscall;
  if (rc == 0) {
    r.done = len;
    return r;
  }
  r.err = errno;
  if (out > 0) {
    r.done = static_cast<uint64_t>(out);
    if (r.err == EAGAIN && r.done < len) r.err = EAGAIN;  // partial: the caller continues
  }
  return r;
}

}  // namespace

FillResult CopyPages(int uffd, uint64_t dst, const void* src, uint64_t len) {
  struct uffdio_copy copy = {};
  copy.dst = dst;
  copy.src = reinterpret_cast<uintptr_t>(src);
  copy.len = len;
  int rc = ioctl(uffd, UFFDIO_COPY, &copy);
  return Outcome(rc, copy.copy, len, "ioctl(UFFDIO_COPY)");
}

FillResult ZeroPages(int uffd, uint64_t dst, uint64_t len) {
  struct uffdio_zeropage zp = {};
  zp.range.start = dst;
  zp.range.len = len;
  int rc = ioctl(uffd, UFFDIO_ZEROPAGE, &zp);
  FillResult r = Outcome(rc, zp.zeropage, len, "ioctl(UFFDIO_ZEROPAGE)");
  r.zero = true;
  return r;
}

FillResult ContinuePages(int uffd, uint64_t dst, uint64_t len) {
  struct uffdio_continue_abi cont = {};
  cont.range.start = dst;
  cont.range.len = len;
  int rc = ioctl(uffd, UFFDIO_CONTINUE_ABI, &cont);
  return Outcome(rc, cont.mapped, len, "ioctl(UFFDIO_CONTINUE)");
}

FillResult PoisonPages(int uffd, uint64_t dst, uint64_t len) {
  struct uffdio_poison_abi poison = {};
  poison.range.start = dst;
  poison.range.len = len;
  int rc = ioctl(uffd, UFFDIO_POISON_ABI, &poison);
  return Outcome(rc, poison.updated, len, "ioctl(UFFDIO_POISON)");
}

void WakePages(int uffd, uint64_t start, uint64_t len) {
  struct uffdio_range range = {start, len};
  ioctl(uffd, UFFDIO_WAKE, &range);
}

// ---- zeros ----------------------------------------------------------------------------------

std::shared_ptr<ZeroRegion> ZeroRegion::Create(uint64_t length, int* err) {
  void* m = mmap(nullptr, length, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    *err = errno;
    return nullptr;
  }
  std::shared_ptr<ZeroRegion> z(new ZeroRegion());
  z->data_ = static_cast<uint8_t*>(m);
  z->length_ = length;
  return z;
}

ZeroRegion::~ZeroRegion() {
  if (data_ != nullptr) munmap(data_, length_);
}

FillResult Filler::Zero(uint64_t dst, uint64_t len) const {
  if (zeros == nullptr) return ZeroPages(uffd, dst, len);
  FillResult r = CopyPages(uffd, dst, zeros->data(), std::min(len, zeros->length()));
  r.zero = true;
  return r;
}

// ---- sources --------------------------------------------------------------------------------

Source* Source::OwnedCopy(const uint8_t* data, uint64_t length, int* err) {
  Source* s = new Source();
  s->kind_ = kBuffer;
  s->length_ = length;
  if (length > 0) {
    s->mapLength_ = AlignUp(length, BasePageSize());
    void* m = mmap(nullptr, s->mapLength_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      *err = errno;
      delete s;
      return nullptr;
    }
    memcpy(m, data, length);
    mprotect(m, s->mapLength_, PROT_READ);  // nothing writes it from here on
    s->map_ = m;
    s->data_ = static_cast<uint8_t*>(m);
  }
  return s;
}

Source* Source::Memory(const uint8_t* data, uint64_t length) {
  Source* s = new Source();
  s->kind_ = kBuffer;
  s->data_ = data;
  s->length_ = length;
  return s;
}

Source* Source::File(int fd, uint64_t offset, uint64_t knownSize, bool useMmap, int* err,
                     std::string* syscall) {
  struct stat st;
  if (fstat(fd, &st) != 0) {
    *err = errno;
    *syscall = "fstat";
    return nullptr;
  }
  uint64_t size = static_cast<uint64_t>(st.st_size);
  if (S_ISBLK(st.st_mode)) {
    // A block device's st_size is 0: its size is where its end is.
    off_t end = lseek(fd, 0, SEEK_END);
    if (end < 0) {
      *err = errno;
      *syscall = "lseek";
      return nullptr;
    }
    size = static_cast<uint64_t>(end);
  }
  if (knownSize != kSizeNow) size = knownSize;
  Source* s = new Source();
  s->kind_ = kFile;
  s->fileOffset_ = offset;
  s->length_ = size > offset ? size - offset : 0;
  s->fd_ = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (s->fd_ < 0) {
    *err = errno;
    *syscall = "fcntl(F_DUPFD_CLOEXEC)";
    delete s;
    return nullptr;
  }
  // mmap needs a file offset aligned to the base page; other offsets are served through pread.
  if (useMmap && s->length_ > 0 && offset % BasePageSize() == 0) {
    s->mapLength_ = AlignUp(s->length_, BasePageSize());
    void* m = mmap(nullptr, s->mapLength_, PROT_READ, MAP_PRIVATE, fd, static_cast<off_t>(offset));
    if (m == MAP_FAILED) {
      *err = errno;
      *syscall = "mmap";
      delete s;
      return nullptr;
    }
    s->map_ = m;
    s->data_ = static_cast<uint8_t*>(m);
  }
  return s;
}

Source* Source::Zero() {
  return new Source();
}

Source* Source::Handler(uint32_t handlerId) {
  Source* s = new Source();
  s->kind_ = kHandler;
  s->handlerId_ = handlerId;
  return s;
}

Source::~Source() {
  Release();
}

void Source::Release() {
  if (map_ != nullptr) munmap(map_, mapLength_);
  if (fd_ >= 0) close(fd_);
  map_ = nullptr;
  fd_ = -1;
  if (kind_ == kFile || kind_ == kBuffer) data_ = nullptr;
}

FillResult Source::Fill(const Filler& f, uint64_t dst, uint64_t at, uint64_t len,
                        std::vector<uint8_t>* scratch) const {
  // Pages wholly past the content are zeros; the page holding the end is bounced (its tail reads
  // as zeros).
  uint64_t contentEnd = kind_ == kZero || kind_ == kHandler ? 0 : AlignUp(length_, f.pageSize);
  if (at >= contentEnd) return f.Zero(dst, len);
  uint64_t n = std::min(len, contentEnd - at);
  if (data_ == nullptr) return Bounce(f, dst, at, n, scratch);  // pread mode
  // Whole pages of content are copied in place; the page holding the end, next step.
  uint64_t whole = std::min(n, AlignDown(length_ - at, f.pageSize));
  if (whole > 0) return f.Copy(dst, data_ + at, whole);
  return Bounce(f, dst, at, n, scratch);
}

FillResult Source::Bounce(const Filler& f, uint64_t dst, uint64_t at, uint64_t n,
                          std::vector<uint8_t>* scratch) const {
  uint64_t t0 = NowNs();
  if (scratch->size() < n) scratch->resize(n);
  uint64_t want = at < length_ ? std::min(n, length_ - at) : 0;
  uint64_t got = 0;
  if (fd_ < 0) {
    memcpy(scratch->data(), data_ + at, want);
    got = want;
  } else {
    while (got < want) {
      ssize_t r = pread(fd_, scratch->data() + got, want - got, static_cast<off_t>(fileOffset_ + at + got));
      if (r < 0 && errno == EINTR) continue;
      FillResult e;
      e.syscall = "pread";
      e.sourceNs = NowNs() - t0;
      if (r < 0) {
        e.err = errno;
        return e;
      }
      if (r == 0) {
        // The file shrank after it was opened: an error, never zeros (or stale bytes) in
        // place of the snapshot's (issue 17, defect 7). The whole pages read go in first, so
        // the error names the first page that cannot be had.
        uint64_t whole = AlignDown(got, f.pageSize);
        if (whole > 0) {
          e = f.Copy(dst, scratch->data(), whole);
          e.sourceNs = NowNs() - t0;
          if (e.err != 0) return e;
        }
        e.err = EIO;
        e.syscall = "pread";
        e.why = "short read: the file is shorter than when it was opened (truncated?)";
        return e;
      }
      got += static_cast<uint64_t>(r);
    }
  }
  if (got < n) memset(scratch->data() + got, 0, n - got);
  uint64_t sourceNs = NowNs() - t0;
  FillResult r = f.Copy(dst, scratch->data(), n);
  r.sourceNs = sourceNs;
  return r;
}
