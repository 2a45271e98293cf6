//! nf_tables change notifications (`NFNLGRP_NFTABLES`), borrowed from the received datagram:
//! the rules a commit added or deleted (`NFT_MSG_NEWRULE`, `NFT_MSG_DELRULE`), and the generation
//! the commit started (`NFT_MSG_NEWGEN`, sent after the commit's other notifications by
//! `nf_tables_commit()`). They arrive on the trace socket in order with the trace events, so the
//! generation each event ran against is the last one announced before it.

use iptrace_common::uapi::{
    NFT_MSG_DELRULE, NFT_MSG_NEWGEN, NFT_MSG_NEWRULE, NFTA_GEN_ID, NFTA_RULE_CHAIN, NFTA_RULE_HANDLE, NFTA_RULE_TABLE,
};

use super::DecodeError;
use crate::netfilter::{netlink::NetlinkMessage, nf_tables::message_type};

pub const NEWGEN_TYPE: u16 = message_type(NFT_MSG_NEWGEN);
pub const NEWRULE_TYPE: u16 = message_type(NFT_MSG_NEWRULE);
pub const DELRULE_TYPE: u16 = message_type(NFT_MSG_DELRULE);

/// One change notification iptrace uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NftChange<'a> {
    /// A commit ended; this generation is in force from now on.
    Generation(u32),
    /// A rule was added or deleted by the commit whose `Generation` follows.
    Rule {
        /// `nfgen_family`: the table's family.
        family: u8,
        table: &'a [u8],
        chain: &'a [u8],
        handle: u64,
    },
}

impl<'a> NftChange<'a> {
    /// Decodes a message of type [`NEWGEN_TYPE`], [`NEWRULE_TYPE`] or [`DELRULE_TYPE`].
    pub fn parse(message: &NetlinkMessage<'a>) -> Result<Self, DecodeError> {
        let (nfgen, attributes) = message.nfnetlink()?;
        if message.message_type == NEWGEN_TYPE {
            for attr in attributes {
                let attr = attr?;
                if u32::from(attr.kind) == NFTA_GEN_ID {
                    return Ok(NftChange::Generation(attr.be_u32()?));
                }
            }
            return Err(DecodeError::IncompleteChange);
        }
        let (mut table, mut chain, mut handle) = (None, None, None);
        for attr in attributes {
            let attr = attr?;
            match u32::from(attr.kind) {
                NFTA_RULE_TABLE => table = Some(attr.c_str()),
                NFTA_RULE_CHAIN => chain = Some(attr.c_str()),
                NFTA_RULE_HANDLE => handle = Some(attr.be_u64()?),
                _ => {}
            }
        }
        match (table, chain, handle) {
            (Some(table), Some(chain), Some(handle)) => {
                Ok(NftChange::Rule { family: nfgen.family(), table, chain, handle })
            }
            _ => Err(DecodeError::IncompleteChange),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::netlink::{NetlinkMessages, attribute, nfnetlink_request};

    #[test]
    fn decodes_generations_and_rule_changes() {
        let rule = [
            attribute(NFTA_RULE_TABLE as u16, b"t\0"),
            attribute(NFTA_RULE_CHAIN as u16, b"c\0"),
            attribute(NFTA_RULE_HANDLE as u16 | 0x4000, &7u64.to_be_bytes()),
        ]
        .concat();
        let mut datagram = nfnetlink_request(DELRULE_TYPE, 0, 0, 2, 0, &rule);
        datagram.extend(nfnetlink_request(
            NEWGEN_TYPE,
            0,
            0,
            0,
            0,
            &attribute(NFTA_GEN_ID as u16, &9u32.to_be_bytes()),
        ));
        datagram.extend(nfnetlink_request(NEWRULE_TYPE, 0, 0, 2, 0, &attribute(NFTA_RULE_TABLE as u16, b"t\0")));
        let changes: Vec<_> = NetlinkMessages::new(&datagram).map(|m| NftChange::parse(&m.unwrap())).collect();
        assert_eq!(
            changes,
            [
                Ok(NftChange::Rule { family: 2, table: b"t", chain: b"c", handle: 7 }),
                Ok(NftChange::Generation(9)),
                Err(DecodeError::IncompleteChange),
            ]
        );
    }
}
