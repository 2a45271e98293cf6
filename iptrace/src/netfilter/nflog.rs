//! nfnetlink_log configuration requests (`NFULNL_MSG_CONFIG`, design.md §3): binding the logger
//! and a group, and the copy mode. Logged packets (`NFULNL_MSG_PACKET`) are decoded by
//! `decode::nflog` over the layouts of [`super::layout`].

use iptrace_common::uapi::{
    NFNL_SUBSYS_ULOG, NFULA_CFG_CMD, NFULA_CFG_MODE, NFULNL_COPY_PACKET, NFULNL_MSG_CONFIG, NLM_F_ACK, NLM_F_REQUEST,
};

use super::{
    layout::{NflogConfigCommand, NflogConfigMode},
    netlink::{attribute, nfnetlink_request, subsystem_message},
};

/// One acknowledged configuration request for `group` (`res_id`) of protocol family `family`
/// (`AF_INET`, `AF_INET6`), carrying `attributes`.
pub fn config_request(sequence: u32, family: u8, group: u16, attributes: &[u8]) -> Vec<u8> {
    nfnetlink_request(
        subsystem_message(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG),
        (NLM_F_REQUEST | NLM_F_ACK) as u16,
        sequence,
        family,
        group,
        attributes,
    )
}

/// `NFULA_CFG_CMD` with `NFULNL_CFG_CMD_*` `command`.
pub fn command(command: u32) -> Vec<u8> {
    let mut cmd = NflogConfigCommand::default();
    cmd.set_command(command as u8);
    attribute(NFULA_CFG_CMD as u16, &cmd.into_bytes())
}

/// `NFULA_CFG_MODE`: whole packets (`NFULNL_COPY_PACKET`, range 0 = the maximum).
pub fn copy_packets() -> Vec<u8> {
    let mut mode = NflogConfigMode::default();
    mode.set_copy_range(0).set_copy_mode(NFULNL_COPY_PACKET as u8);
    attribute(NFULA_CFG_MODE as u16, &mode.into_bytes())
}

#[cfg(test)]
mod tests {
    use iptrace_common::uapi::NFULNL_CFG_CMD_PF_BIND;

    use super::*;
    use crate::netfilter::netlink::NetlinkMessages;

    #[test]
    fn config_requests_are_laid_out_as_libnetfilter_log_sends_them() {
        let request =
            config_request(3, libc::AF_INET6 as u8, 0, &[command(NFULNL_CFG_CMD_PF_BIND), copy_packets()].concat());
        // nlmsghdr {40, 0x0401, REQUEST|ACK, 3, 0}, nfgenmsg {AF_INET6, 0, group 0},
        // NFULA_CFG_CMD {5, 1, PF_BIND, pad}, NFULA_CFG_MODE {10, 2, range 0, COPY_PACKET, pad}.
        let mut expected = Vec::new();
        expected.extend_from_slice(&40u32.to_ne_bytes());
        expected.extend_from_slice(&0x0401u16.to_ne_bytes());
        expected.extend_from_slice(&5u16.to_ne_bytes());
        expected.extend_from_slice(&3u32.to_ne_bytes());
        expected.extend_from_slice(&0u32.to_ne_bytes());
        expected.extend_from_slice(&[10, 0, 0, 0]);
        expected.extend_from_slice(&5u16.to_ne_bytes());
        expected.extend_from_slice(&1u16.to_ne_bytes());
        expected.extend_from_slice(&[3, 0, 0, 0]);
        expected.extend_from_slice(&10u16.to_ne_bytes());
        expected.extend_from_slice(&2u16.to_ne_bytes());
        expected.extend_from_slice(&[0, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(request, expected);
        assert_eq!(NetlinkMessages::new(&request).count(), 1);
    }
}
