//! moelab-workbench: the ratatui terminal workbench (compose, dispatch, inspect timelines).
//!
//! Empty for now: it will drive `moelab::run` and render `moelab::analysis` results; it
//! depends on the root crate, never the other way round.
