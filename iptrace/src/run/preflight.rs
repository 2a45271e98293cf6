//! Before anything on the host changes: the selection compiled, the privileges, the engines that
//! hold the tables and the kernel features marking with them needs, the interfaces named.

use std::{fs, process::Command};

use super::{Options, RunError};
use crate::{
    backend::{self, Backends},
    decode::Family,
    filter::CompiledFilter,
    instrument::Marker,
    netns,
    xtables::Xtables,
};

/// The selection, compiled (in a forked child: to be called while the process has one thread);
/// `None` selects every packet.
pub(super) fn compile_filter(options: &Options) -> Result<Option<CompiledFilter>, RunError> {
    Ok(options
        .selection
        .to_expression()?
        .map(|e| CompiledFilter::compile_bounded(&e, &options.families))
        .transpose()?)
}

/// The engines that hold the tables, checked for what tracing them needs, and the index of the
/// `-o` interface (the `-i` interface is only looked up); in the traced netns.
pub(super) fn check_host(options: &Options) -> Result<(Backends, Option<u32>), RunError> {
    let backends = backend::detect(options.backend, &options.families)?;
    if !backends.nft_tables
        && let Ok(untraced) = backend::nft_tables(&options.families)
        && !untraced.is_empty()
    {
        // Their DROPs would read as "ACCEPT by netfilter, then dropped: NETFILTER_DROP".
        crate::note!(
            "iptrace: warning: --backend legacy traces the iptables-legacy tables only; the nf_tables tables {} \
             are not traced, and a packet they drop shows as dropped after netfilter (use --backend auto)",
            untraced.join(", ")
        );
    }
    // Legacy tables are read with iptables-legacy-save whichever way packets are marked.
    for &family in &backends.legacy {
        Xtables::new(family).check_installed()?;
    }
    if backends.marker == Marker::TraceRules {
        check_kernel_features(&options.families)?;
        if let Some(limit) = options.limit.as_ref().filter(|l| !l.fits_hashlimit()) {
            return Err(RunError::LimitOverflow(limit.clone()));
        }
    }
    let out_ifindex = options.out_interface.as_deref().map(interface_index).transpose()?;
    if let Some(name) = &options.in_interface {
        interface_index(name)?;
    }
    Ok((backends, out_ifindex))
}

/// CAP_NET_ADMIN in the effective set, which every change iptrace makes needs.
pub fn check_privileges() -> Result<(), RunError> {
    const CAP_NET_ADMIN: u32 = 12;
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << CAP_NET_ADMIN) == 0 {
        return Err(RunError::NotPermitted);
    }
    Ok(())
}

/// TRACE and xt_bpf must be there (built in, loaded, or loadable).
fn check_kernel_features(families: &[Family]) -> Result<(), RunError> {
    let needs: [(&str, &str, &'static str, &'static str); 2] = [
        ("targets", "TRACE", "the TRACE target", "CONFIG_NETFILTER_XT_TARGET_TRACE"),
        ("matches", "bpf", "the xt_bpf match", "CONFIG_NETFILTER_XT_MATCH_BPF"),
    ];
    for &family in families {
        let prefix = match family {
            Family::Ipv4 => "/proc/thread-self/net/ip_tables_",
            Family::Ipv6 => "/proc/thread-self/net/ip6_tables_",
        };
        for (list, name, what, config) in needs {
            let path = format!("{prefix}{list}");
            let present = |path: &str| fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| l == name));
            if present(&path) {
                continue;
            }
            // Modular kernels list an extension only once loaded.
            let module = if name == "TRACE" { "xt_TRACE" } else { "xt_bpf" };
            let _ = Command::new("modprobe").arg("-q").arg(module).status();
            if !present(&path) {
                return Err(RunError::KernelFeature { what, config });
            }
        }
    }
    Ok(())
}

fn interface_index(name: &str) -> Result<u32, RunError> {
    netns::interface_index(name).ok_or_else(|| RunError::UnknownInterface(name.to_owned()))
}
