//! Synthetic cards. (Being written.)
