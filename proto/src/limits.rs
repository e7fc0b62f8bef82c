//! Size limits of the protocol. Both sides set them explicitly on every server and client
//! (never tonic's 4 MiB default), and the coordinator's config may lower the per-request ones.

/// Tensors and feature blocks above this size travel as several chunks.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Largest gRPC message either side encodes or decodes: a chunk plus headroom for the
/// envelope, or a Generate step's features.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Largest tensor a receiver reassembles from chunks.
pub const MAX_TENSOR_BYTES: u64 = 1 << 30;

/// Default bound on the feature bytes one `Features` request may ask for.
pub const DEFAULT_MAX_FEATURE_BYTES: u64 = 64 << 20;

/// Default bound on the sequences of one `Features` request.
pub const DEFAULT_MAX_SEQUENCES: u32 = 256;

/// Longest device name accepted at enrollment.
pub const MAX_DEVICE_NAME: usize = 64;
