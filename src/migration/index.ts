// Live migration of memory between hosts (pre-copy, post-copy, hybrid): see docs/migration.md.
export { MigrationSource } from './source'
export type { MigrationSourceOptions, MigrationRange, SourceProgress, RoundInfo } from './source'
export { MigrationTarget, SourceLostError } from './target'
export type {
  MigrationTargetOptions,
  MigrationTargetResult,
  MigrationTargetMemory,
  TargetSetup,
  SourceLossPolicy,
} from './target'
export type { MigrationEndpoint } from './transport'
export type { DirtyTracking } from './dirty'
export type { MigrationResult, Phase as MigrationPhase, PostcopyPriority } from './common'
export { AuthError, SECRET_ENV } from './auth'
export { RejectedError } from './transport'
export { pageHashes } from './hash'
export { PROTOCOL_VERSION, FrameType, FrameParser, encodeFrame, decodeHeader, encodeHeader, checkHeader } from './wire'
export type { Frame, FrameHeader, MigrationMode, MigrationRangeInfo } from './wire'
