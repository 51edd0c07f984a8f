//! The one mapping of etcd-client's errors to the project's.

use etcd_client::Error as EtcdError;
use locker_core::{Error, ErrorKind};

pub(crate) fn map_error(e: EtcdError) -> Error {
    let kind = match &e {
        EtcdError::IoError(_) | EtcdError::TransportError(_) | EtcdError::EndpointError(_) => {
            ErrorKind::Unavailable
        }
        EtcdError::InvalidArgs(_) | EtcdError::InvalidUri(_) | EtcdError::InvalidHeaderValue(_) => {
            ErrorKind::InvalidInput
        }
        EtcdError::LeaseKeepAliveError(_) => ErrorKind::Unavailable,
        EtcdError::Utf8Error(_) => ErrorKind::Corrupt,
        EtcdError::GRpcStatus(status) => status_kind(status.code(), status.message()),
        _ => ErrorKind::Other,
    };
    Error::new(kind, "etcd").with_source(e)
}

fn status_kind(code: tonic::Code, message: &str) -> ErrorKind {
    use tonic::Code;
    match code {
        Code::Unavailable | Code::Aborted | Code::ResourceExhausted | Code::Cancelled => {
            ErrorKind::Unavailable
        }
        Code::DeadlineExceeded => ErrorKind::Timeout,
        Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Auth,
        Code::InvalidArgument if message.contains("authentication failed") => ErrorKind::Auth,
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidInput,
        // "etcdserver: request timed out", "leader changed", "no leader"...
        Code::Unknown | Code::Internal
            if ["timed out", "leader", "too many requests", "not capable"]
                .iter()
                .any(|m| message.contains(m)) =>
        {
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Other,
    }
}
