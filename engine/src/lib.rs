//! The payswitch engine. (Module map being written.)

pub mod demo;
pub mod iso;
pub mod logging;
pub mod serve;
