//! Just enough of a BTF reader (`Documentation/bpf/btf.rst`) to take struct member offsets, enum
//! values and a tracepoint's prototype from the running kernel's `/sys/kernel/btf/vmlinux`.
//! (aya-obj parses BTF too, but keeps its type accessors crate-private.)

use super::DropError;

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A struct or union member, a function parameter or an enum value: name and type id (or value).
#[derive(Clone, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    /// Bit offset for members (bitfield size masked off), the value for enums.
    value: u64,
}

#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    members: Vec<Member>,
}

/// The types and strings of one BTF blob.
pub struct Btf {
    /// Type `id` is at index `id - 1` (id 0 is `void`).
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

impl Btf {
    /// Parses a little-endian BTF blob.
    pub fn parse(bytes: &[u8]) -> Result<Self, DropError> {
        let malformed = |what: &'static str| DropError::Btf { what };
        let magic = bytes.get(..2).map(|m| u16::from_le_bytes([m[0], m[1]]));
        if magic != Some(BTF_MAGIC) {
            return Err(malformed("not little-endian BTF (magic)"));
        }
        let header = |at| u32_at(bytes, at).map(|v| v as usize).ok_or(malformed("header"));
        let header_len = header(4)?;
        let (type_off, type_len, str_off, str_len) = (header(8)?, header(12)?, header(16)?, header(20)?);
        let section = |off: usize, len: usize| {
            let start = header_len.checked_add(off)?;
            bytes.get(start..start.checked_add(len)?)
        };
        let type_bytes = section(type_off, type_len).ok_or(malformed("type section"))?;
        let strings = section(str_off, str_len).ok_or(malformed("string section"))?.to_vec();
        let mut types = Vec::new();
        let mut at = 0;
        while at < type_bytes.len() {
            let word = |i: usize| u32_at(type_bytes, at + 4 * i).ok_or(malformed("truncated type"));
            let (name, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let vlen = (info & 0xffff) as usize;
            at += 12;
            // Word `w` of record `i` of `words` words each (no allocation: vmlinux has ~10^5 types).
            let record = |i: usize, words: usize| -> Result<[u32; 3], DropError> {
                let word = |w: usize| u32_at(type_bytes, at + 4 * (i * words + w)).ok_or(malformed("truncated type"));
                Ok([word(0)?, word(1)?, if words > 2 { word(2)? } else { 0 }])
            };
            let (members, extra) = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => (Vec::new(), 4),
                KIND_ARRAY => (Vec::new(), 12),
                KIND_STRUCT | KIND_UNION => {
                    let members = (0..vlen)
                        .map(|i| {
                            let m = record(i, 3)?;
                            let bits = if kind_flag { m[2] & 0x00ff_ffff } else { m[2] };
                            Ok(Member { name: m[0], type_id: m[1], value: u64::from(bits) })
                        })
                        .collect::<Result<_, DropError>>()?;
                    (members, vlen * 12)
                }
                KIND_ENUM => {
                    let values = (0..vlen)
                        .map(|i| record(i, 2).map(|m| Member { name: m[0], type_id: 0, value: u64::from(m[1]) }))
                        .collect::<Result<_, _>>()?;
                    (values, vlen * 8)
                }
                KIND_ENUM64 => {
                    let values = (0..vlen)
                        .map(|i| {
                            record(i, 3).map(|m| Member {
                                name: m[0],
                                type_id: 0,
                                value: u64::from(m[2]) << 32 | u64::from(m[1]),
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    (values, vlen * 12)
                }
                KIND_FUNC_PROTO => {
                    let params = (0..vlen)
                        .map(|i| record(i, 2).map(|m| Member { name: m[0], type_id: m[1], value: 0 }))
                        .collect::<Result<_, _>>()?;
                    (params, vlen * 8)
                }
                KIND_DATASEC => (Vec::new(), vlen * 12),
                _ => (Vec::new(), 0),
            };
            at += extra;
            types.push(Type { name, kind, size_or_type, members });
        }
        Ok(Self { types, strings })
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// The type `id` names once typedefs and qualifiers are looked through.
    fn resolve(&self, mut id: u32) -> Option<(u32, &Type)> {
        for _ in 0..32 {
            let ty = self.get(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = ty.size_or_type,
                _ => return Some((id, ty)),
            }
        }
        None
    }

    /// The first type of `kind` called `name` (a few look-ups a run: a scan, not an index).
    fn named(&self, kind: u32, name: &str) -> Option<u32> {
        let index = self.types.iter().position(|ty| ty.kind == kind && self.string(ty.name) == name)?;
        u32::try_from(index + 1).ok()
    }

    /// Byte offset and type of `path` (member names; anonymous structs and unions between them
    /// are looked into) from the start of `struct name`.
    pub fn member(&self, name: &str, path: &[&str]) -> Result<Field, DropError> {
        let missing = || DropError::BtfField { name: format!("{name}.{}", path.join(".")) };
        let mut id = self.named(KIND_STRUCT, name).ok_or_else(missing)?;
        let mut bits = 0;
        for part in path {
            let (offset, member_type) = self.find_member(id, part).ok_or_else(missing)?;
            bits += offset;
            id = member_type;
        }
        if bits % 8 != 0 {
            return Err(missing());
        }
        let (_, ty) = self.resolve(id).ok_or_else(missing)?;
        let size = match ty.kind {
            KIND_PTR => 8,
            KIND_INT | KIND_ENUM | KIND_ENUM64 | KIND_STRUCT | KIND_UNION => ty.size_or_type,
            _ => 0,
        };
        Ok(Field { offset: u32::try_from(bits / 8).map_err(|_| missing())?, size })
    }

    /// Bit offset and type of the member `name` of the struct or union `id`, looking into its
    /// anonymous members.
    fn find_member(&self, id: u32, name: &str) -> Option<(u64, u32)> {
        let (_, ty) = self.resolve(id)?;
        if !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        ty.members.iter().find_map(|member| {
            let member_name = self.string(member.name);
            if member_name == name {
                Some((member.value, member.type_id))
            } else if member_name.is_empty() {
                self.find_member(member.type_id, name).map(|(offset, id)| (member.value + offset, id))
            } else {
                None
            }
        })
    }

    /// The values of `enum name` (or 64-bit enum), by value.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(u64, String)>, DropError> {
        let id = self
            .named(KIND_ENUM, name)
            .or_else(|| self.named(KIND_ENUM64, name))
            .ok_or_else(|| DropError::BtfField { name: format!("enum {name}") })?;
        let ty = self.get(id).ok_or_else(|| DropError::BtfField { name: format!("enum {name}") })?;
        Ok(ty.members.iter().map(|m| (m.value, self.string(m.name).to_owned())).collect())
    }

    /// Parameter names and their type names of the raw tracepoint `name`: the prototype of the
    /// kernel's `btf_trace_<name>` typedef, without its first (`void *__data`) parameter.
    pub fn tracepoint_params(&self, name: &str) -> Result<Vec<(String, String)>, DropError> {
        let missing = || DropError::BtfField { name: format!("btf_trace_{name}") };
        let typedef = self.named(KIND_TYPEDEF, &format!("btf_trace_{name}")).ok_or_else(missing)?;
        let (_, pointer) = self.resolve(typedef).ok_or_else(missing)?;
        let (_, proto) = self.resolve(pointer.size_or_type).ok_or_else(missing)?;
        if proto.kind != KIND_FUNC_PROTO {
            return Err(missing());
        }
        Ok(proto.members.iter().skip(1).map(|p| (self.string(p.name).to_owned(), self.type_name(p.type_id))).collect())
    }

    /// A C-like spelling of a type, enough to recognise a parameter (`struct sk_buff *`).
    fn type_name(&self, id: u32) -> String {
        let Some((_, ty)) = self.resolve(id) else {
            return "void".into();
        };
        let name = self.string(ty.name);
        match ty.kind {
            KIND_PTR => format!("{} *", self.type_name(ty.size_or_type)),
            KIND_STRUCT => format!("struct {name}"),
            KIND_UNION => format!("union {name}"),
            KIND_ENUM | KIND_ENUM64 => format!("enum {name}"),
            _ => name.to_owned(),
        }
    }
}

/// Where a member is: bytes from the start of the outer struct, and its size (0 when not a
/// scalar, pointer or aggregate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}
