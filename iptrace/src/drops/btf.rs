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
#[derive(Clone, Copy, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    /// Bit offset for members (bitfield size masked off), the value for enums.
    value: u64,
    /// A bitfield member's size in bits (`kind_flag` structs); 0 for anything else.
    bitfield_bits: u32,
}

/// One type record, read from the blob when looked at.
#[derive(Clone, Copy, Debug)]
struct Type<'a> {
    name: u32,
    kind: u32,
    kind_flag: bool,
    /// `size` or `type`, by kind.
    size_or_type: u32,
    /// The records that follow the type's three words (members, values, parameters, ...).
    extra: &'a [u8],
    vlen: usize,
}

impl Type<'_> {
    /// The members of a struct or union, the values of an enum, the parameters of a function
    /// prototype; nothing for other kinds.
    fn members(&self) -> impl Iterator<Item = Member> + '_ {
        let words = match self.kind {
            KIND_STRUCT | KIND_UNION | KIND_ENUM64 => 3,
            KIND_ENUM | KIND_FUNC_PROTO => 2,
            _ => 0,
        };
        let count = if words == 0 { 0 } else { self.vlen };
        (0..count).filter_map(move |i| {
            let word = |w: usize| u32_at(self.extra, 4 * (i * words + w));
            let (first, second) = (word(0)?, word(1)?);
            Some(match self.kind {
                KIND_STRUCT | KIND_UNION => {
                    let bits = word(2)?;
                    let (offset, bitfield_bits) =
                        if self.kind_flag { (bits & 0x00ff_ffff, bits >> 24) } else { (bits, 0) };
                    Member { name: first, type_id: second, value: u64::from(offset), bitfield_bits }
                }
                KIND_ENUM => Member { name: first, type_id: 0, value: u64::from(second), bitfield_bits: 0 },
                KIND_ENUM64 => Member {
                    name: first,
                    type_id: 0,
                    value: u64::from(word(2)?) << 32 | u64::from(second),
                    bitfield_bits: 0,
                },
                _ => Member { name: first, type_id: second, value: 0, bitfield_bits: 0 },
            })
        })
    }
}

/// The types and strings of one BTF blob, borrowed: only where each type starts is kept (vmlinux
/// has ~10^5 types; decoding them all into owned structs cost ~15 MB of peak memory and most of
/// the time the drop program took to start).
pub struct Btf<'a> {
    type_bytes: &'a [u8],
    /// Type `id` starts at `type_bytes[starts[id - 1]..]` (id 0 is `void`).
    starts: Vec<u32>,
    strings: &'a [u8],
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

impl<'a> Btf<'a> {
    /// Parses a little-endian BTF blob.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DropError> {
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
        let strings = section(str_off, str_len).ok_or(malformed("string section"))?;
        let mut starts = Vec::new();
        let mut at = 0;
        while at < type_bytes.len() {
            let info = u32_at(type_bytes, at + 4).ok_or(malformed("truncated type"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_ENUM64 | KIND_DATASEC => vlen * 12,
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                _ => 0,
            };
            let end = at + 12 + extra;
            if end > type_bytes.len() {
                return Err(malformed("truncated type"));
            }
            starts.push(u32::try_from(at).map_err(|_| malformed("type section"))?);
            at = end;
        }
        Ok(Self { type_bytes, starts, strings })
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    fn get(&self, id: u32) -> Option<Type<'a>> {
        let at = *self.starts.get((id as usize).checked_sub(1)?)? as usize;
        let word = |w: usize| u32_at(self.type_bytes, at + 4 * w);
        let info = word(1)?;
        Some(Type {
            name: word(0)?,
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 == 1,
            size_or_type: word(2)?,
            extra: self.type_bytes.get(at + 12..)?,
            vlen: (info & 0xffff) as usize,
        })
    }

    /// The type `id` names once typedefs and qualifiers are looked through.
    fn resolve(&self, mut id: u32) -> Option<(u32, Type<'a>)> {
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
        let found = (1..=self.starts.len()).find(|&id| {
            let id = u32::try_from(id).unwrap_or(0);
            self.get(id).is_some_and(|ty| ty.kind == kind && self.string(ty.name) == name)
        })?;
        u32::try_from(found).ok()
    }

    /// Byte offset and type of `path` (member names; anonymous structs and unions between them
    /// are looked into) from the start of `struct name`.
    pub fn member(&self, name: &str, path: &[&str]) -> Result<Field, DropError> {
        let missing = || DropError::BtfField { name: format!("{name}.{}", path.join(".")) };
        let mut id = self.named(KIND_STRUCT, name).ok_or_else(missing)?;
        let mut bits = 0;
        for part in path {
            let (member, offset) = self.find_member(id, part).ok_or_else(missing)?;
            bits += offset;
            id = member.type_id;
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

    /// The byte and the bit in it (0 the lowest) of the one-bit bitfield `member` of
    /// `struct name` (anonymous structs and unions between are looked into).
    pub fn flag(&self, name: &str, member: &str) -> Result<(u32, u32), DropError> {
        let missing = || DropError::BtfField { name: format!("{name}.{member} (a one-bit field)") };
        let id = self.named(KIND_STRUCT, name).ok_or_else(missing)?;
        match self.find_member(id, member) {
            Some((found, bits)) if found.bitfield_bits == 1 => {
                Ok((u32::try_from(bits / 8).map_err(|_| missing())?, (bits % 8) as u32))
            }
            _ => Err(missing()),
        }
    }

    /// The member `name` of the struct or union `id`, looking into its anonymous members, and
    /// its bit offset from the start of `id`.
    fn find_member(&self, id: u32, name: &str) -> Option<(Member, u64)> {
        let (_, ty) = self.resolve(id)?;
        if !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        ty.members().find_map(|member| {
            let member_name = self.string(member.name);
            if member_name == name {
                Some((member, member.value))
            } else if member_name.is_empty() {
                self.find_member(member.type_id, name).map(|(found, offset)| (found, member.value + offset))
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
        Ok(ty.members().map(|m| (m.value, self.string(m.name).to_owned())).collect())
    }

    /// The id of the kernel's `btf_trace_<name>` typedef: what a BTF-enabled raw tracepoint
    /// program names as its attach point (`attach_btf_id`).
    pub fn tracepoint_type(&self, name: &str) -> Result<u32, DropError> {
        self.named(KIND_TYPEDEF, &format!("btf_trace_{name}"))
            .ok_or_else(|| DropError::BtfField { name: format!("btf_trace_{name}") })
    }

    /// Parameter names and their type names of the raw tracepoint `name`: the prototype of the
    /// kernel's `btf_trace_<name>` typedef, without its first (`void *__data`) parameter.
    pub fn tracepoint_params(&self, name: &str) -> Result<Vec<(String, String)>, DropError> {
        let missing = || DropError::BtfField { name: format!("btf_trace_{name}") };
        let typedef = self.tracepoint_type(name)?;
        let (_, pointer) = self.resolve(typedef).ok_or_else(missing)?;
        let (_, proto) = self.resolve(pointer.size_or_type).ok_or_else(missing)?;
        if proto.kind != KIND_FUNC_PROTO {
            return Err(missing());
        }
        Ok(proto.members().skip(1).map(|p| (self.string(p.name).to_owned(), self.type_name(p.type_id))).collect())
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

/// A BTF blob in which the typedef `btf_trace_<name>` has the id `type_id`, for aya's
/// `BtfTracePoint::load`. aya looks the attach point up by name in BTF it has parsed, and parsing
/// the kernel's whole BTF with aya costs about 18 MB and tens of milliseconds
/// (`bpf::without_kernel_btf`) when [`Btf::tracepoint_type`] has already found the id. Ids are
/// positions, so `type_id - 1` fillers (pointers to void, 12 bytes each) come first.
pub fn attach_point_blob(name: &str, type_id: u32) -> Vec<u8> {
    const HEADER_LEN: u32 = 24;
    const TYPE_LEN: u32 = 12;
    let strings = [&[0][..], format!("btf_trace_{name}").as_bytes(), &[0]].concat();
    let type_len = type_id * TYPE_LEN;
    let mut blob = Vec::with_capacity((HEADER_LEN + type_len) as usize + strings.len());
    blob.extend(BTF_MAGIC.to_le_bytes());
    blob.extend([1, 0]); // version 1, no flags
    for field in [HEADER_LEN, 0, type_len, type_len, strings.len() as u32] {
        blob.extend(field.to_le_bytes());
    }
    for _ in 1..type_id {
        for field in [0, KIND_PTR << 24, 0] {
            blob.extend(u32::to_le_bytes(field));
        }
    }
    for field in [1, KIND_TYPEDEF << 24, 0] {
        blob.extend(u32::to_le_bytes(field));
    }
    blob.extend(strings);
    blob
}

/// Where a member is: bytes from the start of the outer struct, and its size (0 when not a
/// scalar, pointer or aggregate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}
