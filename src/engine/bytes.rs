//! The one checked reader under every weights file format (safetensors, zip
//! and legacy pickles): no length read from a file is used before it is
//! compared with the bytes actually there.
use std::path::{Path, PathBuf};

use super::error::{EngineError, Result};

/// The one checked reader under every file format: a cursor over bytes that
/// are actually there. Every length taken from a file goes through
/// [`Bytes::take`], which compares it with what remains (in `u64`, so no
/// length can overflow) before anything is sliced or allocated; errors are
/// `Truncated` and name the file, the part and what was being read.
pub(crate) struct Bytes<'a> {
    path: PathBuf,
    part: Option<String>,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    pub(crate) fn new(path: &Path, data: &'a [u8]) -> Self {
        Self { path: path.to_path_buf(), part: None, data, pos: 0 }
    }

    /// Name the part of the file these bytes are (a zip entry) in errors.
    pub(crate) fn part(mut self, name: &str) -> Self {
        self.part = Some(name.to_string());
        self
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    fn prefix(&self) -> String {
        self.part.as_ref().map(|p| format!("{p}: ")).unwrap_or_default()
    }

    /// A `Truncated` error for this file.
    pub(crate) fn truncated(&self, reason: impl Into<String>) -> EngineError {
        EngineError::Truncated { path: self.path.clone(), reason: format!("{}{}", self.prefix(), reason.into()) }
    }

    /// A `Format` error for this file.
    pub(crate) fn format(&self, reason: impl Into<String>) -> EngineError {
        EngineError::Format { path: self.path.clone(), reason: format!("{}{}", self.prefix(), reason.into()) }
    }

    pub(crate) fn seek(&mut self, pos: u64) -> Result<()> {
        if pos > self.data.len() as u64 {
            return Err(self.truncated(format!("offset {pos} past the end ({} bytes)", self.data.len())));
        }
        self.pos = pos as usize;
        Ok(())
    }

    /// The next `n` bytes, if that many remain.
    pub(crate) fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(self.truncated(format!("{what}: needs {n} bytes at offset {}, {left} left", self.pos)));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("N bytes"))
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    /// Bytes up to the next newline (consumed, not returned).
    pub(crate) fn line(&mut self, what: &str) -> Result<&'a [u8]> {
        let rest = &self.data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.pos += i + 1;
                Ok(&rest[..i])
            }
            None => Err(self.truncated(format!("{what}: no end of line after offset {}", self.pos))),
        }
    }
}
