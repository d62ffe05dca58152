use anyhow::Result;
use serde_json::json;
use vmkeep_repo::RestoreOptions;

use crate::args::{Global, RestoreArgs};
use crate::context::open_repo;
use crate::output::{print_json, print_line};
use crate::progress::Bars;
use crate::size::human;

pub fn run(g: &Global, a: &RestoreArgs) -> Result<u8> {
    let repo = open_repo(g)?;
    let m = repo.resolve(&a.snapshot)?;
    let bars = Bars::new(g.quiet);
    let opts = RestoreOptions {
        target: a.target.clone(),
        disk: a.disk.clone(),
    };
    let st = repo.restore(&m, &opts, &bars)?;
    if g.json {
        print_json(&json!({"id": m.id, "disks": st.disks, "seconds": st.seconds}))?;
    } else {
        for d in &st.disks {
            print_line(&format!(
                "restored {} to {} ({} written)",
                d.name,
                d.path.display(),
                human(d.bytes_written)
            ))?;
        }
        print_line(&format!(
            "restore point {:#} restored in {:.2} s",
            m.id, st.seconds
        ))?;
    }
    Ok(0)
}
