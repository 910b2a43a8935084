// userfaultfd: Linux userfaultfd(2) for Node.js.
export { Userfaultfd } from './userfaultfd'
export { EventStream } from './events'
export type { EventsOptions } from './events'
export { FaultResolver } from './fault-resolver'
export type { FaultResolverOptions, ResolveOutcome } from './fault-resolver'
export type { OpenOptions, RegisterModes, WakeOption, CopyOptions, WriteProtectOptions, MoveOptions, UffdEvent } from './userfaultfd'
export { Mapping, hugePageSize } from './mapping'
export type { Advice, Protection, AnonymousOptions, MemfdOptions } from './mapping'
export { UffdError, UnsupportedError, PERMISSION_HINT } from './errors'
export {
  Feature, IoctlBit, Ioctl, Mode, RegisterMode, PagefaultFlag, EventType, OpenFlag,
  UFFD_API, UFFD_MSG_SIZE, PAGE_SIZE, featureNames, ioctlNames, bitNames,
} from './constants'
export type { FeatureName, IoctlName } from './constants'
export type { Probe, AccessResult, Via } from './probe'
export type { Range, RangeLike } from './range'
