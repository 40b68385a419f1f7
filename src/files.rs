//! Writing safetensors files with the same permissions as every other output file.
//! candle (safetensors ≥ 0.8) writes through a `tempfile` and renames it into place, and
//! tempfiles are created mode 0600 whatever the umask; so checkpoints were private while
//! their config.json beside them followed the umask (0644 under the usual 022). After
//! writing we give the file the mode a freshly created file gets (0666 minus the umask).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{LeashError, Result};

/// The mode `File::create` gives a new file in `dir` (0666 & !umask), found by creating one:
/// reading the umask with `umask(2)` would change it for every thread for a moment.
#[cfg(unix)]
fn created_mode(dir: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.join(format!(".leash-mode-probe-{}", std::process::id()));
    std::fs::File::create(&probe)?;
    let mode = std::fs::metadata(&probe)?.permissions().mode() & 0o777;
    std::fs::remove_file(&probe)?;
    Ok(mode)
}

/// Writes `tensors` to `path` (atomically, via candle) with umask-following permissions.
pub fn save_safetensors<K>(tensors: &HashMap<K, Tensor>, path: &Path) -> Result<()>
where
    K: AsRef<str> + Ord + std::fmt::Display,
{
    // Tensors on a GPU come to the host first: candle's writer would copy them itself but
    // panics if the copy fails; here a failure is an error.
    let on_host = tensors
        .iter()
        .map(|(k, t)| Ok((k.to_string(), t.to_device(&candle_core::Device::Cpu)?)))
        .collect::<Result<HashMap<String, Tensor>>>()?;
    candle_core::safetensors::save(&on_host, path).map_err(|e| {
        LeashError::file(
            path,
            format!("cannot write weights: {e}"),
            "check disk space",
        )
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let hint = "check the folder is writable";
        let dir = path.parent().unwrap_or(Path::new("."));
        let mode = created_mode(dir).map_err(|e| LeashError::io(dir, e, hint))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| LeashError::io(path, e, hint))?;
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn safetensors_get_the_mode_of_other_new_files() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::new(&[1f32, 2.0], &candle_core::Device::Cpu).unwrap();
        let path = dir.path().join("w.safetensors");
        save_safetensors(&HashMap::from([("w".to_string(), t)]), &path).unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let mode = |n: &str| {
            std::fs::metadata(dir.path().join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("w.safetensors"), mode("config.json"));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "the probe file is removed"
        );
    }
}
