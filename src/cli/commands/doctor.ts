// `userfaultfd doctor`: the option table and help; the diagnosis is ../doctor.ts.
import { defineCommand } from '../command'
import { doctor } from '../doctor'
import { flag } from '../options'

export const doctorCommand = defineCommand({
  name: 'doctor',
  summary: 'can this machine, user and container use userfaultfd, and which features work here',
  synopsis: '[--json]',
  description: `Checks whether this process can use userfaultfd: the userfaultfd(2) syscall and /dev/userfaultfd for this user, vm.unprivileged_userfaultfd, CAP_SYS_PTRACE, seccomp, containers. Then tries each of the package's features on small mappings (FaultServer kinds, DirtyTracker, live snapshot, MOVE, POISON, minor faults, huge pages) and prints what works, what does not and why, and one list of fixes.

Run it first on a CI runner or in a new container.`,
  options: {
    json: flag({ help: 'print the report as JSON on stdout' }),
  },
  exitStatus: [
    '0  usable',
    '1  not usable',
    '2  usage error',
    '3  usable only with UFFD_USER_MODE_ONLY (faults raised by the kernel, e.g. KVM, are not delivered)',
  ],
  examples: ['userfaultfd doctor', 'userfaultfd doctor --json | jq .features'],
  run: (v) => doctor({ json: v.json }),
})
