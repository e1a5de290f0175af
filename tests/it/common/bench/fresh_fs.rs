//! A fresh filesystem for the snapshots or replicas a benchmark case writes.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A fresh ext4 filesystem (`mkfs.ext4` defaults, journal included) on a
/// loop-mounted sparse image: the state of a typical backup disk, the same
/// for both tools whatever the work directory's filesystem went through.
/// (On ext4 without a journal, the inodes of files deleted in the last minutes
/// are skipped one by one when allocating: every round's clean-up would slow
/// the next round's file creation.)
pub(super) struct FreshFs {
    pub(super) mount: PathBuf,
    image: PathBuf,
}

impl FreshFs {
    /// Makes `work/NAME.img`, mounted on `work/NAME`.
    pub(super) fn make(work: &Path, name: &str) -> Result<FreshFs, String> {
        let (image, mount) = (work.join(format!("{name}.img")), work.join(name));
        // Left mounted by an interrupted run?
        let _ = Command::new("umount").arg(&mount).stderr(std::process::Stdio::null()).status();
        let _ = std::fs::remove_file(&image);
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        let f = std::fs::File::create(&image).map_err(|e| e.to_string())?;
        f.set_len(8 << 30).map_err(|e| e.to_string())?;
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        if !ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image)) {
            return Err("mkfs.ext4 failed".into());
        }
        if !ok(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount)) {
            let _ = std::fs::remove_file(&image);
            return Err("mount -o loop failed (no loop devices here?)".into());
        }
        Ok(FreshFs { mount, image })
    }
}

impl Drop for FreshFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_file(&self.image);
    }
}
