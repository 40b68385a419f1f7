//! Reports: plots drawn beside the numbers.

pub mod plot;
