//! rustls needs one process-wide crypto provider; install `ring`'s if nobody did.

/// Installs the `ring` crypto provider as rustls' default, unless one is installed already.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
