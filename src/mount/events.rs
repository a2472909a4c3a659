//! The kernel's notice of every mount attached to or detached from this mount
//! namespace (fanotify with FAN_REPORT_MNT, Linux 6.15). The notice is queued
//! before the mount call returns, so once the queue is read, every mount made
//! before the read is known: "which mounts show this data" then costs the
//! mounts changed since the last question, not a listing of every mount.
//!
//! The queue is bounded (fs.fanotify.max_queued_events); when it overflows the
//! kernel says so, and the reader lists every mount again, once.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Not in the libc crate yet (include/uapi/linux/fanotify.h, 6.15).
const FAN_REPORT_MNT: libc::c_uint = 0x0000_4000;
const FAN_MARK_MNTNS: libc::c_uint = 0x0000_0110;
const FAN_MNT_ATTACH: u64 = 0x0100_0000;
const FAN_MNT_DETACH: u64 = 0x0200_0000;
const FAN_EVENT_INFO_TYPE_MNT: u8 = 7;
/// The mount namespace of the calling thread: a thread may be in another one
/// than the process's first thread.
const OWN_NAMESPACE: &str = "/proc/thread-self/ns/mnt";

/// What changed, by unique mount id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Attached(u64),
    Detached(u64),
    /// Moved within the namespace: the same mount, elsewhere.
    Moved(u64),
    /// Notices were lost: what is known may be stale.
    Overflow,
}

/// A subscription to one mount namespace's mount changes.
pub struct Watch {
    fd: OwnedFd,
}

impl Watch {
    /// Watches the calling thread's mount namespace. Fails on kernels before
    /// 6.15 and without CAP_SYS_ADMIN.
    pub fn new() -> io::Result<Watch> {
        let flags = libc::FAN_CLASS_NOTIF | FAN_REPORT_MNT | libc::FAN_CLOEXEC | libc::FAN_NONBLOCK;
        let fd = unsafe { libc::fanotify_init(flags, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned to us and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ns = std::fs::File::open(OWN_NAMESPACE)?;
        let r = unsafe {
            libc::fanotify_mark(
                fd.as_raw_fd(),
                libc::FAN_MARK_ADD | FAN_MARK_MNTNS,
                FAN_MNT_ATTACH | FAN_MNT_DETACH,
                ns.as_raw_fd(),
                std::ptr::null(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Watch { fd })
    }

    /// Hands every queued event to `each`, oldest first, until the queue is empty.
    pub fn drain(&self, mut each: impl FnMut(Event)) -> io::Result<()> {
        // A read returns whole records, as many as fit: 4 KiB holds about a
        // hundred, and a question usually finds a few.
        let mut buf = vec![0u64; 512];
        loop {
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len() * 8,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(e),
                };
            }
            // SAFETY: the bytes the kernel just wrote.
            let bytes =
                unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, n as usize) };
            parse(bytes, &mut each)?;
        }
    }
}

/// Reads the records of one read(2): a fixed header, then info records, one of
/// which names the mount.
fn parse(mut bytes: &[u8], each: &mut impl FnMut(Event)) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("fanotify: {what}"));
    let meta_len = std::mem::size_of::<libc::fanotify_event_metadata>();
    while !bytes.is_empty() {
        if bytes.len() < meta_len {
            return Err(bad("short record"));
        }
        let u32_at = |b: &[u8], at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap());
        let u16_at = |b: &[u8], at: usize| u16::from_ne_bytes(b[at..at + 2].try_into().unwrap());
        let u64_at = |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().unwrap());
        let event_len = u32_at(bytes, 0) as usize;
        let header_len = u16_at(bytes, 6) as usize;
        let mask = u64_at(bytes, 8);
        if event_len < header_len || header_len < meta_len || event_len > bytes.len() {
            return Err(bad("record length out of bounds"));
        }
        let (event, rest) = bytes.split_at(event_len);
        bytes = rest;
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            each(Event::Overflow);
            continue;
        }
        let mut info = &event[header_len..];
        let mut id = None;
        while info.len() >= 4 {
            let (kind, len) = (info[0], u16_at(info, 2) as usize);
            if len < 4 || len > info.len() {
                return Err(bad("info record length out of bounds"));
            }
            if kind == FAN_EVENT_INFO_TYPE_MNT && len >= 16 {
                id = Some(u64_at(info, 8));
            }
            info = &info[len..];
        }
        let Some(id) = id else {
            return Err(bad("mount event without a mount id"));
        };
        let attach = mask & FAN_MNT_ATTACH != 0;
        let detach = mask & FAN_MNT_DETACH != 0;
        each(match (attach, detach) {
            (true, true) => Event::Moved(id),
            (true, false) => Event::Attached(id),
            (false, _) => Event::Detached(id),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mask: u64, id: u64) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend_from_slice(&40u32.to_ne_bytes()); // event_len
        r.extend_from_slice(&[3, 0]); // vers, reserved
        r.extend_from_slice(&24u16.to_ne_bytes()); // metadata_len
        r.extend_from_slice(&mask.to_ne_bytes());
        r.extend_from_slice(&(-1i32).to_ne_bytes()); // fd
        r.extend_from_slice(&7i32.to_ne_bytes()); // pid
        r.extend_from_slice(&[FAN_EVENT_INFO_TYPE_MNT, 0]);
        r.extend_from_slice(&16u16.to_ne_bytes());
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(&id.to_ne_bytes());
        r
    }

    #[test]
    fn records_parse_into_events() {
        let mut bytes = record(FAN_MNT_ATTACH, 5);
        bytes.extend(record(FAN_MNT_ATTACH | FAN_MNT_DETACH, 6));
        bytes.extend(record(FAN_MNT_DETACH, 5));
        let mut overflow = record(libc::FAN_Q_OVERFLOW, 0);
        overflow.truncate(24);
        overflow[0..4].copy_from_slice(&24u32.to_ne_bytes());
        bytes.extend(overflow);
        let mut seen = vec![];
        parse(&bytes, &mut |e| seen.push(e)).unwrap();
        assert_eq!(
            seen,
            [
                Event::Attached(5),
                Event::Moved(6),
                Event::Detached(5),
                Event::Overflow
            ]
        );
    }

    #[test]
    fn malformed_records_are_refused() {
        let mut long = record(FAN_MNT_ATTACH, 5);
        long[0..4].copy_from_slice(&80u32.to_ne_bytes());
        assert!(parse(&long, &mut |_| {}).is_err());
        let mut no_id = record(FAN_MNT_ATTACH, 5);
        no_id[24] = 1;
        assert!(parse(&no_id, &mut |_| {}).is_err());
        assert!(parse(&record(FAN_MNT_ATTACH, 5)[..30], &mut |_| {}).is_err());
    }
}
