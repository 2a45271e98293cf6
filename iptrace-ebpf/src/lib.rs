#![no_std]
// Library target only so that `iptrace` can name this crate as a build-dependency (see its build.rs).
