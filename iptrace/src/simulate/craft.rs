//! A [`PacketSpec`] as bytes: the IP packet with its transport header and checksums, and the
//! Ethernet frame that carries it onto the simulated host's `in` interface.

use std::net::IpAddr;

use iptrace_lab::internet_checksum;

use super::spec::{PacketSpec, TransportSpec, headers_len};

/// The IP identification (IPv4) simulated packets carry: constant, so that a run is repeatable.
const PACKET_ID: u16 = 0x5349;

/// A TCP segment's sequence and acknowledgement numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpNumbers {
    pub seq: u32,
    pub ack: u32,
}

impl TcpNumbers {
    /// A connection's first segment (`--flow`'s replies and acknowledgements follow from it).
    pub const FIRST: TcpNumbers = TcpNumbers { seq: 0x5349_0000, ack: 0 };
    /// The reply's initial sequence number with `--flow`.
    pub const REPLY: TcpNumbers = TcpNumbers { seq: 0x5250_0000, ack: Self::FIRST.seq + 1 };
    /// The acknowledgement of the reply.
    pub const THIRD: TcpNumbers = TcpNumbers { seq: Self::FIRST.seq + 1, ack: Self::REPLY.seq + 1 };
}

/// The IP packet `spec` describes, from `src` (the spec's, or the one the host picked); a TCP
/// segment with `numbers`.
pub fn ip_packet(spec: &PacketSpec, src: IpAddr, numbers: TcpNumbers) -> Vec<u8> {
    let total = spec.len.map_or_else(|| headers_len(spec), usize::from);
    let transport = transport(spec, src, total - ip_header_len(spec), numbers);
    let mut packet = match (src, spec.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, spec.tos];
            h.extend_from_slice(&(total as u16).to_be_bytes());
            h.extend_from_slice(&PACKET_ID.to_be_bytes());
            // DF, as Linux sets it on TCP and path-MTU-discovering sockets.
            h.extend_from_slice(&0x4000u16.to_be_bytes());
            h.extend_from_slice(&[spec.ttl, spec.protocol(), 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let sum = internet_checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let first = (6u32 << 28) | (u32::from(spec.tos) << 20);
            let mut h = first.to_be_bytes().to_vec();
            h.extend_from_slice(&((total - 40) as u16).to_be_bytes());
            h.extend_from_slice(&[spec.protocol(), spec.ttl]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        // The parser refuses mixed versions, and a host-picked source is of the destination's.
        _ => unreachable!("source and destination of different IP versions"),
    };
    packet.extend_from_slice(&transport);
    packet
}

fn ip_header_len(spec: &PacketSpec) -> usize {
    if spec.dst.is_ipv4() { 20 } else { 40 }
}

/// The transport header and zero payload, `len` bytes in all, with its checksum.
fn transport(spec: &PacketSpec, src: IpAddr, len: usize, numbers: TcpNumbers) -> Vec<u8> {
    let mut t = Vec::with_capacity(len);
    let checksum_at = match spec.transport {
        TransportSpec::Tcp { sport, dport, flags } => {
            t.extend_from_slice(&sport.to_be_bytes());
            t.extend_from_slice(&dport.to_be_bytes());
            t.extend_from_slice(&numbers.seq.to_be_bytes());
            // An ACK without a connection before it acknowledges 1.
            let ack = match numbers.ack {
                0 if flags.0 & 0x10 != 0 => 1,
                ack => ack,
            };
            t.extend_from_slice(&ack.to_be_bytes());
            t.extend_from_slice(&[5 << 4, flags.0]);
            t.extend_from_slice(&64240u16.to_be_bytes());
            t.extend_from_slice(&[0, 0, 0, 0]);
            16
        }
        TransportSpec::Udp { sport, dport } => {
            t.extend_from_slice(&sport.to_be_bytes());
            t.extend_from_slice(&dport.to_be_bytes());
            t.extend_from_slice(&(len as u16).to_be_bytes());
            t.extend_from_slice(&[0, 0]);
            6
        }
        TransportSpec::Icmp { kind, code } => {
            t.extend_from_slice(&[kind, code, 0, 0]);
            // Echo's identifier and sequence number; the rest of the header for other types.
            t.extend_from_slice(&PACKET_ID.to_be_bytes());
            t.extend_from_slice(&1u16.to_be_bytes());
            2
        }
    };
    t.resize(len, 0);
    // ICMP for IPv4 has no pseudo-header; TCP, UDP and ICMPv6 have one.
    let mut summed = match (spec.transport, src, spec.dst) {
        (TransportSpec::Icmp { .. }, IpAddr::V4(_), _) => Vec::new(),
        (_, IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut p = [s.octets(), d.octets()].concat();
            p.extend_from_slice(&[0, spec.protocol()]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
            p
        }
        (_, IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut p = [s.octets(), d.octets()].concat();
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, spec.protocol()]);
            p
        }
        _ => unreachable!("source and destination of different IP versions"),
    };
    summed.extend_from_slice(&t);
    let mut sum = internet_checksum(&summed);
    if sum == 0 && matches!(spec.transport, TransportSpec::Udp { .. }) {
        // UDP's "no checksum" is 0; a computed 0 is sent as its complement.
        sum = 0xffff;
    }
    t[checksum_at..checksum_at + 2].copy_from_slice(&sum.to_be_bytes());
    t
}

/// `packet` in an Ethernet frame from `src` to `dst`.
pub fn ethernet_frame(dst: [u8; 6], src: [u8; 6], packet: &[u8]) -> Vec<u8> {
    let ethertype: u16 = if packet.first().is_some_and(|b| b >> 4 == 6) { 0x86dd } else { 0x0800 };
    let mut frame = [dst, src].concat();
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(packet);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syn_is_a_valid_ipv4_tcp_packet() {
        let spec = PacketSpec::parse("tcp 10.0.0.2:40000 > 10.0.0.1:22 in eth0 ttl 9 tos 0x10").unwrap();
        let p = ip_packet(&spec, spec.src.unwrap(), TcpNumbers::FIRST);
        assert_eq!(p.len(), 40);
        assert_eq!(&p[..12], &[0x45, 0x10, 0, 40, 0x53, 0x49, 0x40, 0, 9, 6, p[10], p[11]]);
        // A header with its checksum in place sums to zero.
        assert_eq!(internet_checksum(&p[..20]), 0);
        let mut pseudo = p[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(internet_checksum(&pseudo), 0);
        assert_eq!(p[33], 0x02);
    }

    #[test]
    fn udp_over_ipv6_with_a_length_and_checksum() {
        let spec = PacketSpec::parse("udp [2001:db8::1]:53 > [2001:db8::2]:5353 in wan len 100").unwrap();
        let p = ip_packet(&spec, spec.src.unwrap(), TcpNumbers::FIRST);
        assert_eq!(p.len(), 100);
        assert_eq!(&p[4..8], &[0, 60, 17, 64]);
        let mut pseudo = p[8..40].to_vec();
        pseudo.extend_from_slice(&[0, 0, 0, 60, 0, 0, 0, 17]);
        pseudo.extend_from_slice(&p[40..]);
        assert_eq!(internet_checksum(&pseudo), 0);
        let frame = ethernet_frame([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], &p);
        assert_eq!(&frame[12..14], &[0x86, 0xdd]);
    }

    #[test]
    fn an_echo_request_sums_to_zero() {
        let spec = PacketSpec::parse("icmp 10.0.0.5 > 8.8.8.8 echo in lan").unwrap();
        let p = ip_packet(&spec, spec.src.unwrap(), TcpNumbers::FIRST);
        assert_eq!(p.len(), 28);
        assert_eq!((p[20], internet_checksum(&p[20..])), (8, 0));
    }
}
