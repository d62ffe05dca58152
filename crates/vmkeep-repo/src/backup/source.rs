//! A whole VM from a capture driver ([`VmSource`]): the cut, with the memory stream read
//! meanwhile (the guest's writes to RAM wait on it), then every disk, then the VM is released. The caller commits and settles the
//! capture's checkpoints with `finish(committed)`.
use vmkeep_core::stream::CdcParams;
use vmkeep_io::VmSource;

use super::BackupSession;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Name of the memory and device state stream in a restore point.
pub const MEMORY_STREAM: &str = "memory";

impl BackupSession<'_> {
    /// Reads everything `source` captured into this session (not yet committed).
    pub fn add_source(&mut self, source: &mut dyn VmSource, progress: &dyn Progress) -> Result<()> {
        match source.take_memory() {
            // The memory is read while the source cuts (see VmSource): QEMU's migration, and
            // the guest's `cont`, wait for this reader.
            Some(mut memory) => {
                let (cut, read) = std::thread::scope(|s| {
                    let cutter = s.spawn(|| source.cut());
                    let read = self
                        .add_memory_stream(MEMORY_STREAM, &mut memory, progress)
                        .map(drop);
                    (cutter.join(), read)
                });
                match cut {
                    Ok(r) => r.map_err(Error::Source)?,
                    Err(_) => return Err(Error::Internal("the capture thread panicked".into())),
                }
                read?;
                source.memory_done().map_err(Error::Source)?;
            }
            None => source.cut().map_err(Error::Source)?,
        }
        // The VM's definition and boot files: stored, but not VM data, so not in `read_bytes`
        // (which says how much of the VM's disks and memory a backup read).
        let read_before = self.stats.read_bytes;
        for (name, mut stream) in source.config_streams() {
            self.add_stream(&name, &mut stream, CdcParams::GENERAL, progress)?;
        }
        self.stats.read_bytes = read_before;
        for (i, d) in source.disks().iter().enumerate() {
            let (reader, plan) = source.open_disk(i).map_err(Error::Source)?;
            self.add_disk(&d.name, &*reader, plan, progress)?;
            if i == 0 {
                vmkeep_io::kill_point("capture-mid-read"); // one disk read, its reader open
            }
        }
        source.release().map_err(Error::Source)?;
        self.set_pause_ms(source.pause_ms());
        vmkeep_io::kill_point("capture-before-commit");
        Ok(())
    }
}
