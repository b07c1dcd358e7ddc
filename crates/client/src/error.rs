//! The SDK's one error type.

use std::path::PathBuf;

/// Everything a client call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The builder was given no server address.
    #[error("no server address configured: call ClientBuilder::servers")]
    NoServers,
    /// The token cannot be sent as a header (it holds characters a header cannot).
    #[error("invalid token: it must be printable ASCII (the secret `sextant acl` printed)")]
    InvalidToken,
    /// A server address is not a valid URI.
    #[error("invalid server address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// Why it was refused.
        reason: String,
    },
    /// An argument the server would refuse, caught before any network call.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field to fix.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No configured server answered (each was tried once, within the call timeout).
    #[error("no server reachable for {operation}: {last_error}")]
    Unavailable {
        /// The operation that failed.
        operation: &'static str,
        /// The last failure seen.
        last_error: String,
    },
    /// A server answered and refused the request (e.g. invalid argument, not found).
    #[error("{operation} refused by the server ({code:?}): {message}")]
    Rejected {
        /// The operation that failed.
        operation: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message (names the field to fix).
        message: String,
    },
    /// A server answer lacked something the protocol promises.
    #[error("malformed answer from the server: {0}")]
    Protocol(String),
    /// The client was shut down.
    #[error("the client is shut down")]
    Closed,
    /// `build` was called outside a Tokio runtime.
    #[error("no Tokio runtime: build the client from within one")]
    NoRuntime,
    /// The cache file could not be read or written.
    #[error("cache file {path}: {source}")]
    CacheFile {
        /// The file.
        path: PathBuf,
        /// The I/O or format error.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether the operation may succeed if retried later (no server reachable, or a server was
    /// temporarily unable to make a write durable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}
