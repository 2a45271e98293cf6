//! The kernel function a drop happened in, for the drops whose reason says nothing
//! (`NOT_SPECIFIED`: a plain `kfree_skb()`): the tracepoint's `location` is the caller's return
//! address, and `/proc/kallsyms` names the function holding it.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader},
};

/// Where the kernel lists its symbols and their addresses (zeros unless the reader may see them:
/// `kptr_restrict`, CAP_SYSLOG).
const KALLSYMS: &str = "/proc/kallsyms";

/// Kernel code addresses named by `/proc/kallsyms`. The file is read once per address asked for,
/// a line at a time, and nothing of it kept but the answer: drops without a reason come from a
/// few places, and holding the table (a hundred thousand names, 5 MB) would cost more than
/// iptrace's whole memory does.
#[derive(Debug, Default)]
pub struct KernelSymbols {
    named: HashMap<u64, Option<String>>,
}

impl KernelSymbols {
    /// The function holding `address`, or `None` where the kernel does not show addresses.
    pub fn function(&mut self, address: u64) -> Option<String> {
        self.named
            .entry(address)
            .or_insert_with(|| File::open(KALLSYMS).ok().and_then(|file| function_at(BufReader::new(file), address)))
            .clone()
    }
}

/// The text symbol of `listing` (`/proc/kallsyms`: `ffffffff81000000 T _stext`, modules' with
/// `\t[module]` after) that starts last at or before `address`. `None` if every address listed
/// is 0 (hidden) or none is at or before it.
fn function_at(listing: impl BufRead, address: u64) -> Option<String> {
    let mut best: Option<(u64, String)> = None;
    for line in listing.lines() {
        let line = line.ok()?;
        let mut fields = line.split_whitespace();
        let (Some(start), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next()) else { continue };
        if !matches!(kind, "t" | "T") {
            continue;
        }
        let Ok(start) = u64::from_str_radix(start, 16) else { continue };
        if start != 0 && start <= address && best.as_ref().is_none_or(|(b, _)| start > *b) {
            best = Some((start, name.to_owned()));
        }
    }
    best.map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "ffffffff81000000 T _stext
ffffffff81a2b3c0 t tcp_v4_rcv
ffffffff81a2c000 D some_data
ffffffff81a2d100 T tcp_timewait_state_process
ffffffffc0001000 t nf_hook_thing\t[nf_tables]
";

    #[test]
    fn an_address_is_named_by_the_text_symbol_starting_last_before_it() {
        assert_eq!(function_at(LISTING.as_bytes(), 0xffff_ffff_81a2_b3c0).as_deref(), Some("tcp_v4_rcv"));
        // Past a data symbol: only code symbols name a return address.
        assert_eq!(function_at(LISTING.as_bytes(), 0xffff_ffff_81a2_c800).as_deref(), Some("tcp_v4_rcv"));
        assert_eq!(
            function_at(LISTING.as_bytes(), 0xffff_ffff_81a2_d1a4).as_deref(),
            Some("tcp_timewait_state_process")
        );
        assert_eq!(function_at(LISTING.as_bytes(), 0xffff_ffff_c000_1010).as_deref(), Some("nf_hook_thing"));
        assert_eq!(function_at(LISTING.as_bytes(), 0x1000), None);
    }

    #[test]
    fn hidden_addresses_name_nothing() {
        let hidden = "0000000000000000 T _stext\n0000000000000000 t tcp_v4_rcv\n";
        assert_eq!(function_at(hidden.as_bytes(), 0xffff_ffff_81a2_b3c0), None);
    }

    /// The running kernel's own listing names one of its functions inside that function (where
    /// this user may see its addresses).
    #[test]
    fn the_running_kernels_listing_names_its_functions() {
        let listing = std::fs::read_to_string(KALLSYMS).expect("reading /proc/kallsyms");
        let Some(start) = listing.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (start, kind, name) = (f.next()?, f.next()?, f.next()?);
            (kind == "T" && name == "kfree_skb_list_reason").then(|| u64::from_str_radix(start, 16).ok())?
        }) else {
            return;
        };
        if start == 0 {
            return;
        }
        assert_eq!(KernelSymbols::default().function(start + 4).as_deref(), Some("kfree_skb_list_reason"));
    }
}
