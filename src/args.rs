//! Command-line conventions shared by every subcommand: the switchboard path,
//! labels, durations and usage errors. They live in `flower_tools::args`, where the
//! examples and the bench use them too.

pub use flower_tools::args::*;
