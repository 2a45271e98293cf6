//! Netlink framing both ways: zero-copy walks over the messages of a received datagram and the
//! attributes inside them, and the requests iptrace sends, built from the same layouts.

use iptrace_common::uapi::{NLA_F_NESTED, NLA_TYPE_MASK, NLMSG_ALIGNTO};

use super::layout::{
    AttributeHeader, ErrorHeader, NFGENMSG_LEN, NLA_HDRLEN, NLMSG_HDRLEN, NetlinkHeader, NfGenHeader, View,
};

/// A message or attribute that does not fit the bytes it came in.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("bad {what} {len} with {have} bytes left")]
    BadLength { what: &'static str, len: usize, have: usize },
}

/// `NLMSG_ALIGN` / `NLA_ALIGN`: messages and attributes are padded to 4 bytes.
const fn align(len: usize) -> usize {
    const MASK: usize = NLMSG_ALIGNTO as usize - 1;
    (len + MASK) & !MASK
}

/// One netlink message borrowed from a received datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetlinkMessage<'a> {
    pub message_type: u16,
    pub flags: u16,
    pub sequence: u32,
    pub port_id: u32,
    /// Everything after the header, up to `nlmsg_len`.
    pub payload: &'a [u8],
}

impl<'a> NetlinkMessage<'a> {
    /// An nfnetlink message's `nfgenmsg` and the attributes after it.
    pub fn nfnetlink(&self) -> Result<(NfGenHeader<&'a [u8; NFGENMSG_LEN]>, Attributes<'a>), WireError> {
        let (header, attributes) = NfGenHeader::split(self.payload).ok_or(WireError::Truncated {
            what: "nfgenmsg",
            need: NFGENMSG_LEN,
            have: self.payload.len(),
        })?;
        Ok((header, Attributes::new(attributes)))
    }

    /// The error code of an `NLMSG_ERROR` message (0 for an acknowledgement), as a positive errno.
    pub fn error_code(&self) -> i32 {
        ErrorHeader::split(self.payload).map_or(0, |(header, _)| -header.error())
    }
}

/// Walks every message of a datagram. The kernel batches nflog messages without `NLM_F_MULTI`
/// (design.md §4.3), so the walk never looks at the flags to decide where to stop.
#[derive(Clone, Debug)]
pub struct NetlinkMessages<'a> {
    rest: &'a [u8],
}

impl<'a> NetlinkMessages<'a> {
    pub fn new(datagram: &'a [u8]) -> Self {
        Self { rest: datagram }
    }
}

impl<'a> Iterator for NetlinkMessages<'a> {
    type Item = Result<NetlinkMessage<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some((header, _)) = NetlinkHeader::split(self.rest) else {
            let have = self.rest.len();
            self.rest = &[];
            return Some(Err(WireError::Truncated { what: "nlmsghdr", need: NLMSG_HDRLEN, have }));
        };
        let len = header.length() as usize;
        let Some(message) = self.rest.get(..len).filter(|_| len >= NLMSG_HDRLEN) else {
            let have = self.rest.len();
            self.rest = &[];
            return Some(Err(WireError::BadLength { what: "nlmsg_len", len, have }));
        };
        self.rest = self.rest.get(align(len)..).unwrap_or(&[]);
        Some(Ok(NetlinkMessage {
            message_type: header.message_type(),
            flags: header.flags(),
            sequence: header.sequence(),
            port_id: header.port_id(),
            payload: &message[NLMSG_HDRLEN..],
        }))
    }
}

/// One netlink attribute: its type (flags masked off) and its value without padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribute<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

impl<'a> Attribute<'a> {
    pub fn be_u16(&self) -> Result<u16, WireError> {
        self.fixed::<2>().map(u16::from_be_bytes)
    }

    pub fn be_u32(&self) -> Result<u32, WireError> {
        self.fixed::<4>().map(u32::from_be_bytes)
    }

    pub fn be_u64(&self) -> Result<u64, WireError> {
        self.fixed::<8>().map(u64::from_be_bytes)
    }

    /// A NUL-terminated string attribute, without the NUL.
    pub fn c_str(&self) -> &'a [u8] {
        self.value.split(|&b| b == 0).next().unwrap_or_default()
    }

    /// The value viewed as a struct; `what` names the attribute in the error.
    pub fn view<V: View<'a>>(&self, what: &'static str) -> Result<V, WireError> {
        V::split(self.value).map(|(view, _)| view).ok_or(WireError::Truncated {
            what,
            need: V::LEN,
            have: self.value.len(),
        })
    }

    fn fixed<const N: usize>(&self) -> Result<[u8; N], WireError> {
        self.value.first_chunk::<N>().copied().ok_or(WireError::Truncated {
            what: "attribute",
            need: N,
            have: self.value.len(),
        })
    }
}

/// Walks the attributes of a message body (after its family header), or of a nested attribute.
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Attributes<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Self { rest: body }
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<Attribute<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        let (header, _) = AttributeHeader::split(self.rest)?;
        let len = usize::from(header.length());
        let kind = header.kind() & NLA_TYPE_MASK as u16;
        let Some(whole) = self.rest.get(..len).filter(|_| len >= NLA_HDRLEN) else {
            let have = self.rest.len();
            self.rest = &[];
            return Some(Err(WireError::BadLength { what: "nla_len", len, have }));
        };
        self.rest = self.rest.get(align(len)..).unwrap_or(&[]);
        Some(Ok(Attribute { kind, value: &whole[NLA_HDRLEN..] }))
    }
}

/// The `nlmsg_type` of nfnetlink message `message` of `subsystem` (`NFNL_SUBSYS_*`):
/// `NFNL_SUBSYS_ID << 8 | NFNL_MSG_TYPE`.
pub const fn subsystem_message(subsystem: u32, message: u32) -> u16 {
    ((subsystem as u16) << 8) | message as u16
}

/// One netlink message: the header, then `payload`.
pub fn netlink_message(message_type: u16, flags: u16, sequence: u32, payload: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + payload.len();
    let mut header = NetlinkHeader::default();
    header
        .set_length(u32::try_from(len).unwrap_or(u32::MAX))
        .set_message_type(message_type)
        .set_flags(flags)
        .set_sequence(sequence);
    let mut message = Vec::with_capacity(len);
    message.extend_from_slice(&header.into_bytes());
    message.extend_from_slice(payload);
    message
}

/// One nfnetlink request: the netlink header, `nfgenmsg` {family, version 0, `res_id`}, then
/// `attributes` (already encoded with [`attribute`]).
pub fn nfnetlink_request(
    message_type: u16,
    flags: u16,
    sequence: u32,
    family: u8,
    res_id: u16,
    attributes: &[u8],
) -> Vec<u8> {
    let mut nfgen = NfGenHeader::default();
    nfgen.set_family(family).set_res_id(res_id);
    netlink_message(message_type, flags, sequence, &[&nfgen.into_bytes()[..], attributes].concat())
}

/// One netlink attribute, padded to 4 bytes.
pub fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = NLA_HDRLEN + value.len();
    let mut header = AttributeHeader::default();
    header.set_length(u16::try_from(len).unwrap_or(u16::MAX)).set_kind(kind);
    let mut a = Vec::with_capacity(align(len));
    a.extend_from_slice(&header.into_bytes());
    a.extend_from_slice(value);
    a.resize(align(len), 0);
    a
}

/// One attribute holding `attributes` (already encoded with [`attribute`]), flagged as nested
/// the way libnftnl sends them.
pub fn nested_attribute(kind: u16, attributes: &[u8]) -> Vec<u8> {
    attribute(kind | NLA_F_NESTED as u16, attributes)
}

/// `text` with the NUL that netlink string attributes carry.
pub fn c_string(text: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(0);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_batched_messages_and_done() {
        // Two 20-byte messages: a 4-byte body each, the second one NLMSG_DONE.
        let mut buf = Vec::new();
        for (ty, body) in [(0x0400u16, [1u8, 2, 3, 4]), (3, [0, 0, 0, 0])] {
            buf.extend_from_slice(&20u32.to_ne_bytes());
            buf.extend_from_slice(&ty.to_ne_bytes());
            buf.extend_from_slice(&[0; 10]);
            buf.extend_from_slice(&body);
        }
        let msgs: Vec<_> = NetlinkMessages::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0].message_type, 0x0400);
        assert_eq!(msgs[0].payload, &[1, 2, 3, 4]);
        assert_eq!(msgs[1].message_type, 3);
    }

    #[test]
    fn rejects_lengths_past_the_datagram() {
        let mut buf = 200u32.to_ne_bytes().to_vec();
        buf.extend_from_slice(&[0; 12]);
        assert!(matches!(NetlinkMessages::new(&buf).next(), Some(Err(WireError::BadLength { .. }))));
        assert!(matches!(NetlinkMessages::new(&buf[..7]).next(), Some(Err(WireError::Truncated { .. }))));
    }

    #[test]
    fn requests_walk_back_as_they_were_built() {
        let attrs = attribute(1, b"abc\0");
        let msg = nfnetlink_request(0x0a10, 1, 7, 2, 0x0102, &attrs);
        assert_eq!(&msg[..4], &28u32.to_ne_bytes());
        let m = NetlinkMessages::new(&msg).next().unwrap().unwrap();
        assert_eq!((m.message_type, m.flags, m.sequence, m.payload[0]), (0x0a10, 1, 7, 2));
        assert_eq!(&m.payload[2..4], &[1, 2], "res_id is big-endian");
        let (nfgen, mut attributes) = m.nfnetlink().unwrap();
        assert_eq!((nfgen.family(), nfgen.version(), nfgen.res_id()), (2, 0, 0x0102));
        let a = attributes.next().unwrap().unwrap();
        assert_eq!((a.kind, a.c_str()), (1, &b"abc"[..]));
        let nested = nested_attribute(4, &attrs);
        assert_eq!(&nested[..4], &[12, 0, 4, 0x80]);
        let outer = Attributes::new(&nested).next().unwrap().unwrap();
        assert_eq!(outer.kind, 4, "the nested flag is masked off");
        assert_eq!(outer.value, &attrs[..]);
    }

    #[test]
    fn attributes_are_aligned_and_masked() {
        // A 5-byte string (padded to 8) with the nested flag set, then a u32.
        let mut buf = vec![9, 0, 0x0a, 0x80, b'a', b'b', b'c', b'd', 0, 0, 0, 0];
        buf.extend_from_slice(&[8, 0, 2, 0, 0, 0, 1, 0]);
        let attrs: Vec<_> = Attributes::new(&buf).collect::<Result<_, _>>().unwrap();
        assert_eq!(attrs[0].kind, 10);
        assert_eq!(attrs[0].c_str(), b"abcd");
        assert_eq!(attrs[1].be_u32().unwrap(), 256);
    }

    #[test]
    fn error_codes_of_acknowledgements_and_errors() {
        let ack = netlink_message(2, 0, 5, &[&0i32.to_ne_bytes()[..], &[0; 16]].concat());
        let refused = netlink_message(2, 0, 5, &[&(-1i32).to_ne_bytes()[..], &[0; 16]].concat());
        let code = |d: &[u8]| NetlinkMessages::new(d).next().unwrap().unwrap().error_code();
        assert_eq!((code(&ack), code(&refused)), (0, libc::EPERM));
    }
}
