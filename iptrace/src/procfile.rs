//! A `/proc` file looked at again and again (every few milliseconds, by the watchers) through one
//! descriptor: a `pread` from offset 0 instead of an open with its path walk, a read and a close
//! each time. The descriptor keeps the network namespace the file was opened in (`/proc/net` and
//! `/proc/sys/net` resolve it at open), as a fresh open by the same thread would.

use std::{fs::File, io, os::unix::fs::FileExt as _, path::Path};

#[derive(Debug)]
pub struct ProcFile {
    file: File,
    buf: Vec<u8>,
}

impl ProcFile {
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Ok(Self { file: File::open(path)?, buf: Vec::with_capacity(256) })
    }

    /// The whole file as it is now.
    pub fn read(&mut self) -> io::Result<&str> {
        self.buf.clear();
        loop {
            let at = self.buf.len();
            if self.buf.capacity() - at < 128 {
                self.buf.reserve(self.buf.capacity());
            }
            self.buf.resize(self.buf.capacity(), 0);
            let n = self.file.read_at(&mut self.buf[at..], at as u64);
            self.buf.truncate(at + n.as_ref().copied().unwrap_or(0));
            if n? == 0 {
                break;
            }
        }
        std::str::from_utf8(&self.buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_current_contents_each_time() {
        let path = std::env::temp_dir().join(format!("iptrace-procfile-{}", std::process::id()));
        std::fs::write(&path, "raw\nfilter\n").unwrap();
        let mut file = ProcFile::open(&path).unwrap();
        assert_eq!(file.read().unwrap(), "raw\nfilter\n");
        let long = "x".repeat(1000);
        std::fs::write(&path, &long).unwrap();
        assert_eq!(file.read().unwrap(), long);
        std::fs::remove_file(&path).unwrap();
    }
}
