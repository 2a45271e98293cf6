//! The fixed-size parts of netfilter's netlink messages, declared once over the uapi structs that
//! `cargo xtask codegen` generates (`iptrace_common::uapi`): typed views with named field
//! accessors over bytes, in netlink-packet-route's `buffer!` style. Offsets and sizes come from
//! the structs (`offset_of!`, `size_of`), so no field is at a hand-written offset.
//!
//! The same views serve the legacy tables' blobs (`IPT_SO_GET_ENTRIES`): `ipt_entry`,
//! `ip6t_entry` and the match and target headers inside them.
//!
//! A view reads borrowed bytes ([`View::split`] over a received datagram: zero-copy) and writes
//! owned ones (`Layout::default`, then the setters, then `into_bytes`) for requests.

use iptrace_common::uapi::{
    ip6t_entry, ipt_entry, nfgenmsg, nfulnl_msg_config_cmd, nfulnl_msg_config_mode, nfulnl_msg_packet_hdr,
    nfulnl_msg_packet_timestamp, nlattr, nlmsgerr, nlmsghdr, xt_entry_match, xt_entry_target,
};

/// A layout viewing borrowed bytes.
pub trait View<'a>: Sized {
    /// The struct's size.
    const LEN: usize;

    /// The view of the first [`LEN`](Self::LEN) bytes of `bytes`, and the bytes after them;
    /// `None` when `bytes` is shorter.
    fn split(bytes: &'a [u8]) -> Option<(Self, &'a [u8])>;
}

/// Declares a view of the uapi struct `$uapi`, `$len` bytes long: getters (and setters) of the
/// named members (`ip.flags` for a member of a member) in host (`ne`) or network (`be`) byte
/// order, or as the bytes they are (`raw`, for `[u8; N]`).
macro_rules! layout {
    (
        $(#[$meta:meta])*
        pub struct $name:ident($uapi:ty, $len:ident) {
            $(
                $(#[$field_meta:meta])*
                $field:ident / $setter:ident: $ty:tt $order:ident = $($member:ident).+,
            )*
        }
    ) => {
        #[doc = concat!("`sizeof(struct ", stringify!($uapi), ")`.")]
        pub const $len: usize = ::core::mem::size_of::<$uapi>();

        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name<B>(B);

        impl<'a> View<'a> for $name<&'a [u8; $len]> {
            const LEN: usize = $len;

            #[inline]
            fn split(bytes: &'a [u8]) -> Option<(Self, &'a [u8])> {
                let (head, rest) = bytes.split_first_chunk::<$len>()?;
                Some((Self(head), rest))
            }
        }

        impl<'a> $name<&'a mut [u8; $len]> {
            /// The view of the first `LEN` bytes of `bytes` for writing, and the bytes after them;
            /// `None` when `bytes` is shorter.
            #[inline]
            pub fn split_mut(bytes: &'a mut [u8]) -> Option<(Self, &'a mut [u8])> {
                let (head, rest) = bytes.split_first_chunk_mut::<$len>()?;
                Some((Self(head), rest))
            }
        }

        impl Default for $name<[u8; $len]> {
            /// All fields zero, for building a request.
            fn default() -> Self {
                Self([0; $len])
            }
        }

        impl $name<[u8; $len]> {

            pub fn into_bytes(self) -> [u8; $len] {
                self.0
            }
        }

        impl<B: ::core::borrow::Borrow<[u8; $len]>> $name<B> {
            $(
                $(#[$field_meta])*
                #[inline]
                pub fn $field(&self) -> $ty {
                    const AT: usize = ::core::mem::offset_of!($uapi, $($member).+);
                    const END: usize = AT + ::core::mem::size_of::<$ty>();
                    const _: () = assert!(END <= $len);
                    let mut value = [0; ::core::mem::size_of::<$ty>()];
                    value.copy_from_slice(&self.0.borrow()[AT..END]);
                    layout!(@from $order $ty, value)
                }
            )*
        }

        impl<B: ::core::borrow::BorrowMut<[u8; $len]>> $name<B> {
            $(
                #[inline]
                pub fn $setter(&mut self, value: $ty) -> &mut Self {
                    const AT: usize = ::core::mem::offset_of!($uapi, $($member).+);
                    const END: usize = AT + ::core::mem::size_of::<$ty>();
                    self.0.borrow_mut()[AT..END].copy_from_slice(&layout!(@to $order value));
                    self
                }
            )*
        }
    };
    (@from ne $ty:tt, $bytes:expr) => { $ty::from_ne_bytes($bytes) };
    (@from be $ty:tt, $bytes:expr) => { $ty::from_be_bytes($bytes) };
    (@from raw $ty:tt, $bytes:expr) => { $bytes };
    (@to ne $value:expr) => { $value.to_ne_bytes() };
    (@to be $value:expr) => { $value.to_be_bytes() };
    (@to raw $value:expr) => { $value };
}

layout! {
    /// `struct nlmsghdr`: every netlink message starts with it.
    pub struct NetlinkHeader(nlmsghdr, NLMSG_HDRLEN) {
        /// `nlmsg_len`: the message's length, this header included, without the padding after it.
        length / set_length: u32 ne = nlmsg_len,
        message_type / set_message_type: u16 ne = nlmsg_type,
        flags / set_flags: u16 ne = nlmsg_flags,
        sequence / set_sequence: u32 ne = nlmsg_seq,
        port_id / set_port_id: u32 ne = nlmsg_pid,
    }
}

layout! {
    /// `struct nlattr`: the header of one attribute, its value follows.
    pub struct AttributeHeader(nlattr, NLA_HDRLEN) {
        /// `nla_len`: header and value, without the padding after it.
        length / set_length: u16 ne = nla_len,
        /// `nla_type`, with the `NLA_F_NESTED` and `NLA_F_NET_BYTEORDER` flags.
        kind / set_kind: u16 ne = nla_type,
    }
}

layout! {
    /// `struct nfgenmsg`: the header of every nfnetlink message, after `nlmsghdr`.
    pub struct NfGenHeader(nfgenmsg, NFGENMSG_LEN) {
        /// `nfgen_family`: an `NFPROTO_*` value (a table's family for nf_tables).
        family / set_family: u8 ne = nfgen_family,
        version / set_version: u8 ne = version,
        /// `res_id`: nflog's group, or the subsystem a batch is for.
        res_id / set_res_id: u16 be = res_id,
    }
}

layout! {
    /// `struct nlmsgerr`: the payload of `NLMSG_ERROR`, an acknowledgement when `error` is 0.
    pub struct ErrorHeader(nlmsgerr, NLMSGERR_LEN) {
        /// A negative errno, or 0.
        error / set_error: i32 ne = error,
    }
}

layout! {
    /// `struct nfulnl_msg_packet_hdr`: `NFULA_PACKET_HDR` of a logged packet.
    pub struct NflogPacketHeader(nfulnl_msg_packet_hdr, NFULNL_PACKET_HDR_LEN) {
        hw_protocol / set_hw_protocol: u16 be = hw_protocol,
        /// The netfilter hook (`enum nf_inet_hooks`).
        hook / set_hook: u8 ne = hook,
    }
}

layout! {
    /// `struct nfulnl_msg_packet_timestamp`: `NFULA_TIMESTAMP`, `skb->tstamp`.
    pub struct NflogTimestamp(nfulnl_msg_packet_timestamp, NFULNL_TIMESTAMP_LEN) {
        seconds / set_seconds: u64 be = sec,
        microseconds / set_microseconds: u64 be = usec,
    }
}

layout! {
    /// `struct nfulnl_msg_config_cmd`: `NFULA_CFG_CMD`.
    pub struct NflogConfigCommand(nfulnl_msg_config_cmd, NFULNL_CONFIG_CMD_LEN) {
        command / set_command: u8 ne = command,
    }
}

layout! {
    /// `struct nfulnl_msg_config_mode` (packed): `NFULA_CFG_MODE`.
    pub struct NflogConfigMode(nfulnl_msg_config_mode, NFULNL_CONFIG_MODE_LEN) {
        /// How many bytes of each packet to copy; 0 is the maximum.
        copy_range / set_copy_range: u32 be = copy_range,
        /// `NFULNL_COPY_*`.
        copy_mode / set_copy_mode: u8 ne = copy_mode,
    }
}

layout! {
    /// `struct ipt_entry`: one rule of an IPv4 legacy table's blob; its matches follow, then its
    /// target at `target_offset`, then the next entry at `next_offset`.
    pub struct Ipv4Entry(ipt_entry, IPT_ENTRY_LEN) {
        /// `ip.flags`: `IPT_F_GOTO` for `-g`.
        flags / set_flags: u8 ne = ip.flags,
        target_offset / set_target_offset: u16 ne = target_offset,
        next_offset / set_next_offset: u16 ne = next_offset,
        packets / set_packets: u64 ne = counters.pcnt,
        bytes / set_bytes: u64 ne = counters.bcnt,
    }
}

layout! {
    /// `struct ip6t_entry`: [`Ipv4Entry`] for IPv6, with a larger `ipv6` part in front.
    pub struct Ipv6Entry(ip6t_entry, IP6T_ENTRY_LEN) {
        /// `ipv6.flags`: `IP6T_F_GOTO` for `-g`.
        flags / set_flags: u8 ne = ipv6.flags,
        target_offset / set_target_offset: u16 ne = target_offset,
        next_offset / set_next_offset: u16 ne = next_offset,
        packets / set_packets: u64 ne = counters.pcnt,
        bytes / set_bytes: u64 ne = counters.bcnt,
    }
}

layout! {
    /// `struct xt_entry_match` as userspace sees it: one match of an entry, its data follows.
    pub struct MatchHeader(xt_entry_match, XT_ENTRY_MATCH_LEN) {
        /// `u.user.match_size`: header and data.
        size / set_size: u16 ne = u.user.match_size,
        /// `u.user.name`: the extension's name, NUL-terminated.
        name / set_name: [u8; 29] raw = u.user.name,
    }
}

layout! {
    /// `struct xt_entry_target` as userspace sees it: an entry's target, its data follows (the
    /// verdict of the standard target, whose name is empty; the chain name of an `ERROR` target).
    pub struct TargetHeader(xt_entry_target, XT_ENTRY_TARGET_LEN) {
        /// `u.user.target_size`: header and data.
        size / set_size: u16 ne = u.user.target_size,
        /// `u.user.name`: the extension's name, NUL-terminated.
        name / set_name: [u8; 29] raw = u.user.name,
    }
}

#[cfg(test)]
mod tests {
    use iptrace_common::uapi::{NFULA_PACKET_HDR, NFULA_TIMESTAMP};

    use super::*;
    use crate::{capture::recording, decode::nftrace::tests::captured, netfilter::netlink::NetlinkMessages};

    /// A real nfnetlink_log datagram: the golden recording's first (raw PREROUTING, IPv6).
    fn nflog_datagram() -> &'static [u8] {
        recording::datagrams(include_bytes!("../../tests/golden/router-trace.bin")).next().unwrap()
    }

    #[test]
    fn sizes_are_the_kernels() {
        assert_eq!(
            [NLMSG_HDRLEN, NLA_HDRLEN, NFGENMSG_LEN, NLMSGERR_LEN, NFULNL_PACKET_HDR_LEN, NFULNL_TIMESTAMP_LEN],
            [16, 4, 4, 20, 4, 16]
        );
        assert_eq!([NFULNL_CONFIG_CMD_LEN, NFULNL_CONFIG_MODE_LEN], [1, 6], "packed");
    }

    #[test]
    fn legacy_entries_are_where_the_kernel_puts_them() {
        // The offsets iptrace read the blobs at before these layouts (x86-64 and every other
        // 64-bit arch: `struct xt_counters` is 8-byte aligned).
        assert_eq!([IPT_ENTRY_LEN, IP6T_ENTRY_LEN, XT_ENTRY_MATCH_LEN, XT_ENTRY_TARGET_LEN], [112, 168, 32, 32]);
        let mut entry = Ipv4Entry::default();
        entry.set_flags(0x02).set_target_offset(0x0102).set_next_offset(0x0304).set_packets(5).set_bytes(6);
        let bytes = entry.into_bytes();
        assert_eq!(
            (bytes[82], &bytes[88..90], &bytes[90..92]),
            (0x02, &0x0102u16.to_ne_bytes()[..], &0x0304u16.to_ne_bytes()[..])
        );
        assert_eq!((&bytes[96..104], &bytes[104..112]), (&5u64.to_ne_bytes()[..], &6u64.to_ne_bytes()[..]));
        let mut entry = Ipv6Entry::default();
        entry.set_flags(0x04).set_target_offset(0x0102).set_next_offset(0x0304).set_packets(5).set_bytes(6);
        let bytes = entry.into_bytes();
        assert_eq!(
            (bytes[131], &bytes[140..142], &bytes[142..144]),
            (0x04, &0x0102u16.to_ne_bytes()[..], &0x0304u16.to_ne_bytes()[..])
        );
        assert_eq!((&bytes[152..160], &bytes[160..168]), (&5u64.to_ne_bytes()[..], &6u64.to_ne_bytes()[..]));
        let mut target = TargetHeader::default();
        let mut name = [0; 29];
        name[..5].copy_from_slice(b"ERROR");
        target.set_size(40).set_name(name);
        let bytes = target.into_bytes();
        assert_eq!((&bytes[..2], &bytes[2..7], bytes[31]), (&40u16.to_ne_bytes()[..], &b"ERROR"[..], 0));
        let joined = [bytes.as_slice(), &[1, 2]].concat();
        let (read, data) = TargetHeader::split(&joined).unwrap();
        assert_eq!((read.size(), read.name(), data), (40, name, &[1, 2][..]));
    }

    #[test]
    fn headers_of_a_captured_nflog_message() {
        let datagram = nflog_datagram();
        let (header, rest) = NetlinkHeader::split(datagram).unwrap();
        assert_eq!(
            (header.length(), header.message_type(), header.flags(), header.sequence(), header.port_id()),
            (244, 0x0400, 0, 0, 0),
            "one NFULNL_MSG_PACKET, unsolicited"
        );
        let (nfgen, _) = NfGenHeader::split(rest).unwrap();
        assert_eq!((nfgen.family(), nfgen.version(), nfgen.res_id()), (10, 0, 0), "IPv6, group 0");
        let message = NetlinkMessages::new(datagram).next().unwrap().unwrap();
        let attributes: Vec<_> = message.nfnetlink().unwrap().1.collect::<Result<_, _>>().unwrap();
        let attribute = |kind: u32| attributes.iter().find(|a| u32::from(a.kind) == kind).unwrap();
        let packet: NflogPacketHeader<_> = attribute(NFULA_PACKET_HDR).view("NFULA_PACKET_HDR").unwrap();
        assert_eq!((packet.hw_protocol(), packet.hook()), (0x86dd, 0), "ETH_P_IPV6 at NF_INET_PRE_ROUTING");
        let timestamp: NflogTimestamp<_> = attribute(NFULA_TIMESTAMP).view("NFULA_TIMESTAMP").unwrap();
        assert_eq!((timestamp.seconds(), timestamp.microseconds()), (1_795_743_206, 766_826));
        // The same fields where the C structs put them, read by hand: the layouts agree.
        assert_eq!(&datagram[4..6], &0x0400u16.to_ne_bytes());
        assert_eq!(attribute(NFULA_PACKET_HDR).value[..3], [0x86, 0xdd, 0]);
        assert_eq!(&attribute(NFULA_TIMESTAMP).value[..8], &1_795_743_206u64.to_be_bytes());
    }

    #[test]
    fn built_headers_are_the_captured_bytes() {
        // An nf_tables trace event as the kernel sent it: nlmsghdr {180, NFT_MSG_TRACE}, then
        // nfgenmsg {NFPROTO_INET, 0, 0}.
        let captured = &captured()[0];
        let (read, rest) = NetlinkHeader::split(captured).unwrap();
        let mut built = NetlinkHeader::default();
        built.set_length(180).set_message_type(0x0a11);
        assert_eq!((&built.into_bytes()[..], read.length()), (&captured[..NLMSG_HDRLEN], 180));
        let mut nfgen = NfGenHeader::default();
        nfgen.set_family(1);
        assert_eq!(&nfgen.into_bytes(), &rest[..NFGENMSG_LEN]);
        // Network byte order where the struct says `__be`.
        let mut mode = NflogConfigMode::default();
        mode.set_copy_range(0x0102_0304).set_copy_mode(2);
        assert_eq!(mode.into_bytes(), [1, 2, 3, 4, 2, 0]);
        let mut nfgen = NfGenHeader::default();
        nfgen.set_res_id(0x0a0b);
        assert_eq!(nfgen.into_bytes(), [0, 0, 0x0a, 0x0b]);
        let mut error = ErrorHeader::default();
        error.set_error(-libc::EPERM);
        let bytes = error.into_bytes();
        let (read, _) = ErrorHeader::split(&bytes).unwrap();
        assert_eq!((read.error(), &bytes[..4]), (-1, &(-1i32).to_ne_bytes()[..]));
    }

    #[test]
    fn short_bytes_have_no_view() {
        assert!(NetlinkHeader::split(&nflog_datagram()[..NLMSG_HDRLEN - 1]).is_none());
        let (_, rest) = AttributeHeader::split(&[8, 0, 1, 0, 9]).unwrap();
        assert_eq!(rest, [9]);
    }
}
