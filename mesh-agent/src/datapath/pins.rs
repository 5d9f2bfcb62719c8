//! The two bpffs operations aya does not offer for pinned objects: putting
//! a new program into a pinned link in place (`BPF_LINK_UPDATE`, atomic: no
//! moment without a program), and checking that a pinned map has the
//! layout this agent's programs expect before they reuse it.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::{MapInfo, MapType};

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `union bpf_attr` is at most this big for the commands used here.
const ATTR_WORDS: usize = 16;

fn bpf(cmd: libc::c_long, attr: &mut [u64; ATTR_WORDS]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed, properly sized and aligned `bpf_attr` for
    // `cmd`; the kernel reads no more than the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens the object pinned at `path`.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut attr = [0u64; ATTR_WORDS];
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; }
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that only we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes the link pinned at `path` run `program` from now on. The link
/// stays attached throughout: the kernel swaps the program atomically.
pub(super) fn replace_program(path: &Path, program: BorrowedFd<'_>) -> io::Result<()> {
    let link = obj_get(path)?;
    let mut attr = [0u64; ATTR_WORDS];
    // struct { __u32 link_fd; __u32 new_prog_fd; __u32 flags; __u32 old_prog_fd; }
    attr[0] = u64::from(link.as_raw_fd().cast_unsigned()) | (u64::from(program.as_raw_fd().cast_unsigned()) << 32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// The layout a map must have to be reused.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Shape {
    pub kind: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// Why the map pinned at a path cannot be reused, if it cannot.
pub(super) fn mismatch(path: &Path, want: Shape) -> Option<String> {
    let info = match MapInfo::from_pin(path) {
        Ok(i) => i,
        Err(e) => return Some(format!("unreadable: {e}")),
    };
    let got = Shape {
        kind: match info.map_type() {
            Ok(k) => k,
            Err(e) => return Some(format!("unknown type: {e}")),
        },
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    };
    (got != want).then(|| format!("pinned {got:?}, this agent needs {want:?}"))
}
