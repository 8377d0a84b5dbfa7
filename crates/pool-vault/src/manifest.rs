//! Manifests: a file as 1 MiB chunks, each with its BLAKE3 hash, and a
//! root hash over the size and the chunk hashes (a two-level tree, as bao
//! has many levels: one is enough when the whole list travels first).
//!
//! The receiver checks every chunk against its hash before writing it, and
//! the hash list against the root before asking for anything, so a file
//! whose every chunk checked out is the file the sender hashed.

use std::io::Read;
use std::path::Path;

use crate::VaultError;

/// The chunk size.
pub const CHUNK: u64 = 1 << 20;

/// A BLAKE3 hash.
pub type Hash = [u8; 32];

/// A file's chunk hashes and root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The file's size.
    pub size: u64,
    /// Each chunk's hash, in order.
    pub hashes: Vec<Hash>,
}

/// The hash of one chunk.
pub fn chunk_hash(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// How many chunks a file of `size` bytes has (a chunk of size
/// `chunk`; an empty file has none).
pub fn chunk_count(size: u64, chunk: u64) -> u64 {
    size.div_ceil(chunk)
}

impl Manifest {
    /// The manifest of the file at `path`, reading it once; a large file
    /// is hashed by up to four threads, each a share of the chunks.
    pub fn of_file(path: &Path) -> Result<Manifest, VaultError> {
        let io = |e| VaultError::io(path, e);
        let f = std::fs::File::open(path).map_err(io)?;
        let size = f.metadata().map_err(io)?.len();
        let count = chunk_count(size, CHUNK);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4) as u64;
        if threads < 2 || count < 64 {
            return Manifest::of_reader(f, size, CHUNK).map_err(io);
        }
        let per = count.div_ceil(threads);
        let parts: Vec<std::io::Result<Vec<Hash>>> = std::thread::scope(|s| {
            let f = &f;
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        use std::os::unix::fs::FileExt;
                        let mut buf = vec![0u8; CHUNK as usize];
                        let mut out = Vec::new();
                        for i in (t * per)..((t + 1) * per).min(count) {
                            let n = (size - i * CHUNK).min(CHUNK) as usize;
                            f.read_exact_at(&mut buf[..n], i * CHUNK)?;
                            out.push(chunk_hash(&buf[..n]));
                        }
                        Ok(out)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread failed")))
                })
                .collect()
        });
        let mut hashes = Vec::with_capacity(count as usize);
        for p in parts {
            hashes.extend(p.map_err(io)?);
        }
        Ok(Manifest { size, hashes })
    }

    /// The manifest of `size` bytes from `r`, in chunks of `chunk`.
    pub fn of_reader(mut r: impl Read, size: u64, chunk: u64) -> std::io::Result<Manifest> {
        let mut buf = vec![0u8; chunk as usize];
        let mut hashes = Vec::with_capacity(chunk_count(size, chunk) as usize);
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk) as usize;
            r.read_exact(&mut buf[..n])?;
            hashes.push(chunk_hash(&buf[..n]));
            left -= n as u64;
        }
        Ok(Manifest { size, hashes })
    }

    /// The root: `BLAKE3(derive_key "pool vault manifest v1", size || hashes)`.
    pub fn root(&self) -> Hash {
        let mut h = blake3::Hasher::new_derive_key("pool vault manifest v1");
        h.update(&self.size.to_be_bytes());
        for c in &self.hashes {
            h.update(c);
        }
        *h.finalize().as_bytes()
    }

    /// The root as hex.
    pub fn root_hex(&self) -> String {
        hex(&self.root())
    }

    /// Checks that the hash list fits the size and the declared root.
    pub fn check(&self, root_hex: &str, chunk: u64) -> Result<(), VaultError> {
        if self.hashes.len() as u64 != chunk_count(self.size, chunk) {
            return Err(VaultError::Protocol(format!(
                "{} chunk hashes for a file of {} bytes",
                self.hashes.len(),
                self.size
            )));
        }
        if self.root_hex() != root_hex {
            return Err(VaultError::Protocol(
                "the chunk hashes do not match the file's root hash".into(),
            ));
        }
        Ok(())
    }

    /// The byte length of chunk `i`.
    pub fn chunk_len(&self, i: u64, chunk: u64) -> usize {
        (self.size - i * chunk).min(chunk) as usize
    }
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_cover_every_byte_and_bind_the_size() {
        let data: Vec<u8> = (0..(2 * CHUNK + 5)).map(|i| (i % 251) as u8).collect();
        let m = Manifest::of_reader(&data[..], data.len() as u64, CHUNK).unwrap();
        assert_eq!(m.hashes.len(), 3);
        assert_eq!(m.chunk_len(2, CHUNK), 5);
        m.check(&m.root_hex(), CHUNK).unwrap();
        // One byte changed anywhere changes the root.
        let mut other = data.clone();
        other[CHUNK as usize + 7] ^= 1;
        let m2 = Manifest::of_reader(&other[..], other.len() as u64, CHUNK).unwrap();
        assert_ne!(m.root(), m2.root());
        // The same hashes with another size do not match.
        let m3 = Manifest {
            size: m.size + 1,
            hashes: m.hashes.clone(),
        };
        assert!(m3.check(&m.root_hex(), CHUNK).is_err());
        // The threaded path (64 chunks or more) gives the same manifest.
        let big: Vec<u8> = (0..(70 * CHUNK + 3))
            .map(|i| (i ^ (i >> 11)) as u8)
            .collect();
        let path = std::env::temp_dir().join(format!("pool-vault-manifest-{}", std::process::id()));
        std::fs::write(&path, &big).unwrap();
        let threaded = Manifest::of_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            threaded,
            Manifest::of_reader(&big[..], big.len() as u64, CHUNK).unwrap()
        );
        let empty = Manifest::of_reader(&b""[..], 0, CHUNK).unwrap();
        assert!(empty.hashes.is_empty());
        empty.check(&empty.root_hex(), CHUNK).unwrap();
    }
}
