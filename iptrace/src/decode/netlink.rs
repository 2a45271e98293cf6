//! Zero-copy views of netlink datagrams: the message headers and the attributes inside them; and
//! the few requests iptrace sends, built the same way.

use super::DecodeError;

const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
/// `NLA_TYPE_MASK`: the nested and byte-order flags live in the top two bits of `nla_type`.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// `NLA_F_NESTED`: the attribute's value is a list of attributes.
const NLA_F_NESTED: u16 = 0x8000;

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// One netlink message borrowed from a received datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetlinkMessage<'a> {
    pub message_type: u16,
    pub flags: u16,
    pub sequence: u32,
    pub port_id: u32,
    /// Everything after the 16-byte header, up to `nlmsg_len`.
    pub payload: &'a [u8],
}

/// One nfnetlink request: the netlink header, `nfgenmsg` {family, version 0, `res_id` big-endian},
/// then `attributes` (already encoded with [`attribute`]).
pub fn nfnetlink_request(
    message_type: u16,
    flags: u16,
    sequence: u32,
    family: u8,
    res_id: u16,
    attributes: &[u8],
) -> Vec<u8> {
    let len = NLMSG_HDRLEN + 4 + attributes.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    msg.extend_from_slice(&message_type.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&sequence.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[family, 0]);
    msg.extend_from_slice(&res_id.to_be_bytes());
    msg.extend_from_slice(attributes);
    msg
}

/// One netlink attribute, padded to 4 bytes.
pub fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = NLA_HDRLEN + value.len();
    let mut a = Vec::with_capacity(align4(len));
    a.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(align4(len), 0);
    a
}

/// One attribute holding `attributes` (already encoded with [`attribute`]), flagged as nested
/// the way libnftnl sends them.
pub fn nested_attribute(kind: u16, attributes: &[u8]) -> Vec<u8> {
    attribute(kind | NLA_F_NESTED, attributes)
}

/// The error code of an `NLMSG_ERROR` message (0 for an acknowledgement), as a positive errno.
pub fn error_code(message: &NetlinkMessage<'_>) -> i32 {
    message.payload.get(..4).map_or(0, |b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
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
    type Item = Result<NetlinkMessage<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some(header) = self.rest.get(..NLMSG_HDRLEN) else {
            let len = self.rest.len();
            self.rest = &[];
            return Some(Err(DecodeError::Truncated { what: "nlmsghdr", need: NLMSG_HDRLEN, have: len }));
        };
        let len = u32::from_ne_bytes(header[0..4].try_into().unwrap_or_default()) as usize;
        let Some(message) = self.rest.get(..len).filter(|_| len >= NLMSG_HDRLEN) else {
            let have = self.rest.len();
            self.rest = &[];
            return Some(Err(DecodeError::BadLength { what: "nlmsg_len", len, have }));
        };
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(NetlinkMessage {
            message_type: u16::from_ne_bytes([header[4], header[5]]),
            flags: u16::from_ne_bytes([header[6], header[7]]),
            sequence: u32::from_ne_bytes([header[8], header[9], header[10], header[11]]),
            port_id: u32::from_ne_bytes([header[12], header[13], header[14], header[15]]),
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
    pub fn be_u16(&self) -> Result<u16, DecodeError> {
        self.fixed::<2>().map(u16::from_be_bytes)
    }

    pub fn be_u32(&self) -> Result<u32, DecodeError> {
        self.fixed::<4>().map(u32::from_be_bytes)
    }

    pub fn be_u64(&self) -> Result<u64, DecodeError> {
        self.fixed::<8>().map(u64::from_be_bytes)
    }

    /// A NUL-terminated string attribute, without the NUL.
    pub fn c_str(&self) -> &'a [u8] {
        self.value.split(|&b| b == 0).next().unwrap_or_default()
    }

    fn fixed<const N: usize>(&self) -> Result<[u8; N], DecodeError> {
        self.value.get(..N).and_then(|b| b.try_into().ok()).ok_or(DecodeError::Truncated {
            what: "attribute",
            need: N,
            have: self.value.len(),
        })
    }
}

/// Walks the attributes of a message body (after its family header).
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
    type Item = Result<Attribute<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < NLA_HDRLEN {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([self.rest[0], self.rest[1]]));
        let kind = u16::from_ne_bytes([self.rest[2], self.rest[3]]) & NLA_TYPE_MASK;
        let Some(whole) = self.rest.get(..len).filter(|_| len >= NLA_HDRLEN) else {
            let have = self.rest.len();
            self.rest = &[];
            return Some(Err(DecodeError::BadLength { what: "nla_len", len, have }));
        };
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(Attribute { kind, value: &whole[NLA_HDRLEN..] }))
    }
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
        assert!(matches!(NetlinkMessages::new(&buf).next(), Some(Err(DecodeError::BadLength { .. }))));
        assert!(matches!(NetlinkMessages::new(&buf[..7]).next(), Some(Err(DecodeError::Truncated { .. }))));
    }

    #[test]
    fn requests_walk_back_as_they_were_built() {
        let attrs = attribute(1, b"abc\0");
        let msg = nfnetlink_request(0x0a10, 1, 7, 2, 0, &attrs);
        let m = NetlinkMessages::new(&msg).next().unwrap().unwrap();
        assert_eq!((m.message_type, m.flags, m.sequence, m.payload[0]), (0x0a10, 1, 7, 2));
        let a = Attributes::new(&m.payload[4..]).next().unwrap().unwrap();
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
}
