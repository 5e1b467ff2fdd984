//! The Luna Node API client (being written).

mod error;

pub use error::ApiError;
