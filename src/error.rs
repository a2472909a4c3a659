//! One error type for the domain, and its single mapping to gRPC statuses at the edge.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, classified by what the caller can do about it. Each variant maps
/// to the gRPC code the CSI spec names for that case.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The root's filesystem is full (ENOSPC), said in the caller's terms.
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Internal(String),
    /// A system call failed; `what` says what we were doing.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what we were doing when it happened.
    pub fn io(what: impl Into<String>, source: impl Into<io::Error>) -> Self {
        Error::Io {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// Adds context to I/O results: `fs::create_dir(p).ctx(|| format!("create {p:?}"))?`.
pub trait Context<T> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T, E: Into<io::Error>> Context<T> for std::result::Result<T, E> {
    fn ctx<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

impl Error {
    /// The filesystem is full, as opposed to a quota (EDQUOT) or a topology.
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::NoSpace(_) => true,
            Error::Io { source, .. } => source.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) | Error::NoSpace(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::Internal(_) => Code::Internal,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
                _ => Code::Internal,
            },
        };
        tonic::Status::new(code, bounded(e.to_string()))
    }
}

/// Longest status message sent, in bytes. Messages quote the caller's input, and
/// a message beyond the peer's header limit turns the answer into an HTTP/2
/// protocol error the caller cannot read.
pub const MAX_STATUS_MESSAGE: usize = 1024;

fn bounded(mut msg: String) -> String {
    if msg.len() > MAX_STATUS_MESSAGE {
        let mut end = MAX_STATUS_MESSAGE;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
        msg.push_str("...");
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_space_is_resource_exhausted() {
        let e = Error::io("write", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::ResourceExhausted
        );
        let e = Error::io("write", io::Error::from_raw_os_error(libc::EIO));
        assert!(!e.is_no_space());
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Internal);
        let e = Error::NoSpace("no room for the copy".into());
        assert!(e.is_no_space());
        assert_eq!(
            tonic::Status::from(e).code(),
            tonic::Code::ResourceExhausted
        );
        let quota = Error::io("write", io::Error::from_raw_os_error(libc::EDQUOT));
        assert!(!quota.is_no_space());
        assert!(Error::io("write", io::Error::from_raw_os_error(libc::ENOSPC)).is_no_space());
    }

    #[test]
    fn long_messages_are_cut_on_a_character() {
        let s = tonic::Status::from(Error::InvalidArgument("é".repeat(4000)));
        assert!(s.message().len() <= MAX_STATUS_MESSAGE + 3);
        assert!(s.message().ends_with("..."));
    }
}
