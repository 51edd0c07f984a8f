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
        // The server's TLS certificate is not trusted (or does not match): a configuration
        // problem, which no retry cures.
        Code::Unavailable if message.contains("certificate") => ErrorKind::Auth,
        Code::Unavailable | Code::Aborted | Code::ResourceExhausted | Code::Cancelled => {
            ErrorKind::Unavailable
        }
        Code::DeadlineExceeded => ErrorKind::Timeout,
        Code::Unauthenticated | Code::PermissionDenied => ErrorKind::Auth,
        Code::InvalidArgument if message.contains("authentication failed") => ErrorKind::Auth,
        Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidInput,
        // "etcdserver: request timed out", "leader changed", "no leader"...
        Code::Unknown | Code::Internal
            if [
                "timed out",
                "leader",
                "too many requests",
                "not capable",
                "transport error",
            ]
            .iter()
            .any(|m| message.contains(m)) =>
        {
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::status_kind;
    use locker_core::ErrorKind;
    use tonic::Code;

    #[test]
    fn statuses_map_to_kinds() {
        let cases = [
            (
                Code::Unavailable,
                "connection refused",
                ErrorKind::Unavailable,
            ),
            (
                Code::Unavailable,
                "invalid peer certificate: UnknownIssuer",
                ErrorKind::Auth,
            ),
            (Code::Unknown, "transport error", ErrorKind::Unavailable),
            (
                Code::Unknown,
                "etcdserver: leader changed",
                ErrorKind::Unavailable,
            ),
            (Code::DeadlineExceeded, "", ErrorKind::Timeout),
            (Code::Unauthenticated, "", ErrorKind::Auth),
            (
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
                ErrorKind::Auth,
            ),
            (Code::InvalidArgument, "bad key", ErrorKind::InvalidInput),
            (Code::Unknown, "something new", ErrorKind::Other),
        ];
        for (code, message, kind) in cases {
            assert_eq!(status_kind(code, message), kind, "{code:?} {message:?}");
        }
    }
}
