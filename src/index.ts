// userfaultfd: Linux userfaultfd(2) for Node.js.
export { Userfaultfd } from './core/userfaultfd'
export { EventStream } from './core/events'
export type { EventsOptions } from './core/events'
export { FaultResolver } from './core/fault-resolver'
export type { FaultResolverOptions, ResolveOutcome } from './core/fault-resolver'
export type {
  OpenOptions,
  RegisterModes,
  WakeOption,
  CopyOptions,
  WriteProtectOptions,
  MoveOptions,
  UffdEvent,
  EventItem,
  Address,
  CopySource,
} from './core/userfaultfd'
export { Mapping, hugePageSize } from './core/mapping'
export type { Advice, Protection, AnonymousOptions, MemfdOptions, FromFdOptions } from './core/mapping'
export { UffdError, UnsupportedError, PERMISSION_HINT } from './core/errors'
export type { UnsupportedDetail } from './core/errors'
export { FEATURE_SINCE, kernelRelease, hasFeature, missingFeatures } from './core/kernel-features'
export type { KernelFeature, MissingFeature } from './core/kernel-features'
export {
  Feature,
  IoctlBit,
  Ioctl,
  Mode,
  RegisterMode,
  PagefaultFlag,
  EventType,
  OpenFlag,
  UFFD_API,
  UFFD_MSG_SIZE,
  PAGE_SIZE,
  featureNames,
  ioctlNames,
  bitNames,
} from './core/constants'
export type { FeatureName, IoctlName } from './core/constants'
export type { Probe, AccessResult, Via } from './core/probe'
export type { Range, RangeLike, Bytes } from './core/range'
export {
  FdChannel,
  sendFds,
  receiveFds,
  socketPair,
  peerCredentials,
  socketFd,
  pidfdOpen,
  fdFlags,
  whenReadable,
} from './ipc/fd-passing'
export type { PeerCredentials, SocketLike, ReceiveOptions, ReceivedMessage } from './ipc/fd-passing'
export { sendUffd, receiveUffd, isUserfaultfd } from './ipc/uffd-passing'
export type { ReceivedUffd } from './ipc/uffd-passing'
export { FirecrackerHandler } from './firecracker/handler'
export type {
  FirecrackerHandlerOptions,
  FirecrackerHandlerEvents,
  HandlerStats,
  ConnectionStats,
  ServingCounts,
} from './firecracker/handler'
export { parseRegions, ProtocolError } from './firecracker/protocol'
export type { GuestRegion, ParseOptions } from './firecracker/protocol'
export { FaultServer } from './engines/fault-server'
export type {
  FaultServerOptions,
  FaultServerEvents,
  FaultServerError,
  FaultSource,
  FaultHandler,
  FaultRequest,
  ServeOptions,
  FaultServerStats,
  FaultServerProgress,
  BackgroundPriority,
  LatencySummary,
  PageBytes,
  ReadMethod,
  RemovePolicy,
  FaultMode,
  FaultStage,
  PageClass,
  SourceErrorPolicy,
  Backing,
  FaultServerRangeStats,
  MetricsOptions,
} from './engines/fault-server'
/** A latency histogram's non-empty buckets (FaultServer.latencyHistogram()), to merge or summarise. */
export type { HistogramJSON } from './util/histogram'
export { RemoteSource } from './sources/remote'
export type { RemoteOptions, RemoteCounters } from './sources/remote'
export { SourceError } from './sources/store'
export type { BlockStore, ReadOptions } from './sources/store'
export { NbdStore, parseNbdUrl } from './sources/nbd'
export type { NbdOptions, NbdTarget, ExportInfo, HandedOver } from './sources/nbd'
export { HttpStore } from './sources/http'
export type { HttpOptions } from './sources/http'
export { MemoryCache, FileCache } from './sources/cache'
export type { PageCache, CacheOptions, CacheStats } from './sources/cache'
export { Manifest } from './sources/manifest'
export type { ManifestData } from './sources/manifest'
export { WorkingSet, WorkingSetError } from './sources/working-set'
export type { SnapshotIdentity } from './sources/snapshot-identity'
export type { FeedStats } from './sources/feed'
export type { RemoteSpec } from './engines/fed-ranges'
export { FaultTrace } from './engines/fault-trace'
export type { FaultKind, FaultRecord } from './engines/fault-trace'
export { takeSnapshot, LiveSnapshot } from './engines/live-snapshot'
export type {
  SnapshotSink,
  SnapshotOptions,
  SnapshotProgress,
  SnapshotStats,
  CopyMethod,
} from './engines/live-snapshot'
export { DirtyTracker, dirtyTrackingSupport } from './engines/dirty-tracker'
export type {
  DirtyRange,
  DirtyTrackerOptions,
  DirtyTrackingSupport,
  DirtyTrackingInputs,
  DirtyTrackingMode,
  MemoryKind,
} from './engines/dirty-tracker'
export { pagemapScan, pagemapScanSupported, PageCategory, PagemapScanFlag } from './engines/pagemap-scan'
export type { PagemapScanOptions, PagemapScanResult, PageRegion, PageCategoryName } from './engines/pagemap-scan'
export {
  MigrationSource,
  MigrationTarget,
  SourceLostError,
  AuthError,
  RejectedError,
  pageHashes,
  PROTOCOL_VERSION,
} from './migration'
export type {
  MigrationSourceOptions,
  MigrationRange,
  MigrationTargetOptions,
  MigrationTargetResult,
  MigrationResult,
  MigrationPhase,
  MigrationMode,
  SourceProgress,
  RoundInfo,
  TargetSetup,
  SourceLossPolicy,
  MigrationTargetMemory,
  MigrationEndpoint,
  MigrationRangeInfo,
  DirtyTracking,
  PostcopyPriority,
} from './migration'
export type { TypedEmitter, TypedEvents, EventMap, TypedEventName, TypedListener } from './util/typed-emitter'
export { CHANNELS as diagnosticsChannels } from './util/diagnostics'
export type { FaultsMessage, ErrorMessage, ConnectionMessage } from './util/diagnostics'
