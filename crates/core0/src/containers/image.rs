//! Container images: download, digest-keyed read-only cache, safe unpacking.
