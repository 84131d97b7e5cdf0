//! `info.*`: host facts read from `/proc` and `/sys`.
