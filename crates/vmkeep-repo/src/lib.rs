//! vmkeep-repo (under construction)
