//! A small blocking QMP client for tests: it observes and steers a VM independently of
//! vmkeep's own (async) client, the code under test.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// How long one reply may take before the test fails.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// One QMP connection, greeting read and capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connecting to QMP at {}: {e}", path.display()));
        s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        };
        let greeting = q.read().expect("the QMP greeting");
        assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
        q.execute("qmp_capabilities", Value::Null);
        q
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("reading QMP: {e}"))?;
        if n == 0 {
            return Err("QMP connection closed".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP line {line:?}: {e}"))
    }

    /// Runs `cmd` (`args` null: none) and returns its `return` value, or the error reply or
    /// transport failure as text. Events in between are skipped.
    pub fn try_execute(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let mut msg = json!({ "execute": cmd });
        if !args.is_null() {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).unwrap();
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if v.get("error").is_some() {
                return Err(format!("QMP {cmd}: {v}"));
            }
        }
    }

    /// [`Qmp::try_execute`] that must succeed.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        self.try_execute(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd}: {e}"))
    }
}
