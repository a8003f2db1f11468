//! Private scratch directories for lab processes: config files, pid files, drift files and
//! unix sockets that must not collide between concurrent tests and must not outlive them.
//!
//! Names are `xnl-<pid>-<n>-<label>.d` in the temp directory: the pid lets
//! [`cleanup_stale_dirs`] remove what a crashed run left behind, the counter keeps the
//! threads of one test binary apart. Directories are mode 0700 because some tools insist on
//! it (chronyd refuses a command socket in a directory others can enter).

use std::{
    fs::{self, DirBuilder},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Once,
    },
};

use anyhow::{Context, Result};

use crate::netns::pid_alive;

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// A directory that exists as long as this guard; dropping it removes it with its contents.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates a fresh, empty, mode-0700 directory whose name carries `label` (for humans
    /// reading `/tmp`). Removes stale scratch directories of dead processes once per process.
    pub fn new(label: &str) -> Result<Self> {
        STALE_CLEANUP.call_once(|| {
            cleanup_stale_dirs(pid_alive);
        });
        let safe: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(24)
            .collect();
        let path = std::env::temp_dir().join(format!(
            "xnl-{}-{}-{safe}.d",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        // Not recursive: an existing directory of that name is someone else's, never reuse it.
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create scratch directory {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `contents` to `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.join(name);
        fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("nat-lab: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

/// The owner pid of a scratch directory name (`xnl-<pid>-<n>-<label>.d`).
fn dir_owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("xnl-")?.strip_suffix(".d")?;
    let (pid, rest) = rest.split_once('-')?;
    let (counter, _label) = rest.split_once('-')?;
    if counter.is_empty() || !counter.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes scratch directories whose owning process is dead (a crashed run never dropped its
/// guards). Returns how many it removed.
pub fn cleanup_stale_dirs(pid_alive: impl Fn(u32) -> bool) -> usize {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = dir_owner_pid(&name.to_string_lossy()) else {
            continue;
        };
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir && !pid_alive(pid) && fs::remove_dir_all(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn scratch_dir_is_private_and_removed_on_drop() {
        let dir = ScratchDir::new("unit test").unwrap();
        let path = dir.path().to_path_buf();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let file = dir.write("a.conf", "x").unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "x");
        assert!(path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("unit_test"));
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn dir_names_carry_the_owner_pid() {
        assert_eq!(dir_owner_pid("xnl-123-4-chrony.d"), Some(123));
        for other in [
            "xnl-123-4-chrony.log",
            "xnl-123-x-a.d",
            "xnl-a-1-b.d",
            "xnl123-4",
            "other.d",
        ] {
            assert_eq!(dir_owner_pid(other), None, "{other}");
        }
    }

    #[test]
    fn stale_dirs_of_dead_owners_are_removed() {
        let live = ScratchDir::new("live").unwrap();
        // pid 0 is never a process: a stand-in for a dead owner.
        let dead = std::env::temp_dir().join("xnl-0-0-dead.d");
        fs::create_dir_all(dead.join("sub")).unwrap();
        let me = std::process::id();
        cleanup_stale_dirs(|pid| pid == me);
        assert!(!dead.exists());
        assert!(live.path().exists());
    }
}
