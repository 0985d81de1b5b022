//! The base model's side of the safety evaluation, kept in the artifact store under
//! `baselines/<key>/` so that every worker, on any machine, reuses what one measured.

use crate::eval::safety::baseline::{self, BaseSide, BaselineCache, ANSWERS_FILE, FILES};
use anyhow::Result;
use loraforge_storage::{layout, Store};
use tokio::runtime::Handle;

pub struct StoredBaselines {
    pub store: Store,
    pub runtime: Handle,
}

impl BaselineCache for StoredBaselines {
    fn load(&self, key: &str) -> Result<Option<BaseSide>> {
        let prefix = layout::baseline_prefix(key);
        // The answers are written last: where they are, the whole entry is.
        let answers = format!("{prefix}/{ANSWERS_FILE}");
        if self.runtime.block_on(self.store.size(&answers))?.is_none() {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        for file in FILES {
            self.runtime.block_on(
                self.store
                    .download(&format!("{prefix}/{file}"), &dir.path().join(file)),
            )?;
        }
        baseline::read(dir.path()).map(Some)
    }

    fn save(&self, key: &str, base: &BaseSide) -> Result<()> {
        let dir = tempfile::tempdir()?;
        baseline::write(base, dir.path())?;
        let prefix = layout::baseline_prefix(key);
        for file in FILES {
            let bytes = std::fs::read(dir.path().join(file))?;
            self.runtime
                .block_on(self.store.put(&format!("{prefix}/{file}"), bytes.into()))?;
        }
        Ok(())
    }
}
