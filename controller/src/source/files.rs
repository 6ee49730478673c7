//! The files source: a directory of manifests, what the lab and file deployments use.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{Source, SourceError};
use crate::model::{parse_documents, Cluster};

/// Every `*.yaml`/`*.yml` file of a directory, multi-document, read in name order.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    seen: Option<Vec<(PathBuf, SystemTime, u64)>>,
}

impl FileSource {
    /// Watches `dir`.
    pub fn new(dir: &Path) -> Self {
        FileSource {
            dir: dir.to_path_buf(),
            seen: None,
        }
    }

    fn files(&self) -> Result<Vec<(PathBuf, SystemTime, u64)>, SourceError> {
        let read = |source| SourceError::Read {
            path: self.dir.clone(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(read)? {
            let path = entry.map_err(read)?.path();
            let yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
            if !yaml {
                continue;
            }
            let meta = std::fs::metadata(&path).map_err(|source| SourceError::Read {
                path: path.clone(),
                source,
            })?;
            files.push((path, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len()));
        }
        files.sort();
        Ok(files)
    }
}

impl Source for FileSource {
    fn poll(&mut self, force: bool) -> Result<Option<Cluster>, SourceError> {
        let files = self.files()?;
        if !force && self.seen.as_ref() == Some(&files) {
            return Ok(None);
        }
        let mut objects = Vec::new();
        for (path, _, _) in &files {
            let text = std::fs::read_to_string(path).map_err(|source| SourceError::Read {
                path: path.clone(),
                source,
            })?;
            objects.extend(parse_documents(&text, &path.display().to_string())?);
        }
        self.seen = Some(files);
        Ok(Some(Cluster::from_objects(objects)))
    }
}
