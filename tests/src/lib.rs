//! End-to-end tests live in `tests/it/`; this library is empty. The package's two
//! binaries are the `master` and `worker` entry points, rebuilt here so Cargo
//! gives the tests their paths.
