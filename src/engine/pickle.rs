//! Just enough of Python's pickle machine to read PyTorch checkpoints, built
//! for files we do not control.
//!
//! Every object lives once in an arena ([`Pickle::nodes`]) and is referred to
//! by index: the memo stores indices, so fetching an entry again costs one
//! slot and never copies it (no exponential growth from re-fetched memo
//! entries), mutations (`APPEND`, `SETITEMS`) are seen through every
//! reference as in Python, cycles cannot leak, and dropping a deeply nested
//! object is flat (no recursion). The machine itself runs on a stack and
//! never recurses; every length it reads is checked against the bytes there
//! ([`Bytes`]). Callers that walk the result bound their depth.
use std::collections::HashMap;

use super::bytes::Bytes;
use super::error::clip;
use super::error::Result;

/// Index of an object in [`Pickle::nodes`].
pub(crate) type Id = usize;

/// The most objects one pickle may create. A real SD-2.1 UNet pickle creates
/// about 15,000; the bound only keeps the arena's memory in proportion.
pub(crate) const MAX_NODES: usize = 1 << 22;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// `bytes`: only their length is kept (checkpoints never need them).
    Bytes(usize),
    Global {
        module: String,
        name: String,
    },
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Reduce {
        callable: Id,
        args: Id,
    },
    Build {
        obj: Id,
        state: Id,
    },
    PersId(Id),
}

impl Node {
    /// A short description that never prints nested content.
    pub(crate) fn kind(&self) -> String {
        match self {
            Node::None => "None".into(),
            Node::Bool(b) => format!("bool {b}"),
            Node::Int(i) => format!("int {i}"),
            Node::Float(f) => format!("float {f}"),
            Node::Str(s) if s.len() <= 64 => format!("string {s:?}"),
            Node::Str(s) => format!("string of {} bytes", s.len()),
            Node::Bytes(n) => format!("bytes of length {n}"),
            Node::Global { module, name } => format!("global {}.{}", clip(module, 64), clip(name, 64)),
            Node::Tuple(v) => format!("tuple of {}", v.len()),
            Node::List(v) => format!("list of {}", v.len()),
            Node::Dict(v) => format!("dict of {}", v.len()),
            Node::Reduce { .. } => "reduce".into(),
            Node::Build { .. } => "build".into(),
            Node::PersId(_) => "persistent id".into(),
        }
    }
}

/// The objects of one pickle and its result.
#[derive(Debug)]
pub(crate) struct Pickle {
    pub nodes: Vec<Node>,
    pub root: Id,
}

impl Pickle {
    pub(crate) fn node(&self, id: Id) -> &Node {
        &self.nodes[id]
    }

    /// The integer at `id`, if it is one.
    pub(crate) fn int(&self, id: Id) -> Option<i64> {
        match self.nodes[id] {
            Node::Int(v) => Some(v),
            Node::Bool(b) => Some(b as i64),
            _ => None,
        }
    }

    pub(crate) fn str(&self, id: Id) -> Option<&str> {
        match &self.nodes[id] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Items of a tuple or a list.
    pub(crate) fn items(&self, id: Id) -> Option<&[Id]> {
        match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    pub(crate) fn global(&self, id: Id) -> Option<(&str, &str)> {
        match &self.nodes[id] {
            Node::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }
}

struct Machine {
    nodes: Vec<Node>,
    stack: Vec<Id>,
    /// Stack heights at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

/// Run the pickle machine from the reader's position up to and including the
/// STOP opcode; the reader is left just after it.
pub(crate) fn load(r: &mut Bytes) -> Result<Pickle> {
    let mut m = Machine { nodes: Vec::new(), stack: Vec::new(), marks: Vec::new(), memo: HashMap::new() };
    loop {
        let at = r.pos();
        let op = r.u8("pickle opcode")?;
        match m.step(op, r) {
            Ok(true) => break,
            Ok(false) => {}
            Err(Step::Bad(msg)) => return Err(r.format(format!("pickle opcode {op:#04x} at byte {at}: {msg}"))),
            Err(Step::Engine(e)) => return Err(e),
        }
    }
    let root = m.stack.pop().ok_or_else(|| r.format("pickle: STOP with an empty stack"))?;
    Ok(Pickle { nodes: m.nodes, root })
}

enum Step {
    Bad(String),
    Engine(super::error::EngineError),
}

impl From<super::error::EngineError> for Step {
    fn from(e: super::error::EngineError) -> Self {
        Step::Engine(e)
    }
}

type StepResult<T> = std::result::Result<T, Step>;

fn bad<T>(msg: impl Into<String>) -> StepResult<T> {
    Err(Step::Bad(msg.into()))
}

impl Machine {
    fn new_node(&mut self, n: Node) -> StepResult<Id> {
        if self.nodes.len() >= MAX_NODES {
            return bad(format!("more than {MAX_NODES} objects"));
        }
        self.nodes.push(n);
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, n: Node) -> StepResult<()> {
        let id = self.new_node(n)?;
        self.stack.push(id);
        Ok(())
    }

    fn pop(&mut self) -> StepResult<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return bad("stack underflow");
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> StepResult<Id> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.last() {
            Some(&id) if self.stack.len() > floor => Ok(id),
            _ => bad("stack underflow"),
        }
    }

    /// Everything above the last MARK, which is removed.
    fn pop_mark(&mut self) -> StepResult<Vec<Id>> {
        match self.marks.pop() {
            Some(h) => Ok(self.stack.split_off(h)),
            None => bad("no MARK"),
        }
    }

    fn memo_put(&mut self, key: u32) -> StepResult<()> {
        let id = self.top()?;
        self.memo.insert(key, id);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> StepResult<()> {
        match self.memo.get(&key) {
            Some(&id) => {
                self.stack.push(id);
                Ok(())
            }
            None => bad(format!("memo entry {key} missing")),
        }
    }

    fn string(bytes: &[u8]) -> StepResult<String> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => bad(format!("string is not UTF-8 ({e})")),
        }
    }

    fn setitems(&mut self, dict: Id, kv: Vec<Id>) -> StepResult<()> {
        if !kv.len().is_multiple_of(2) {
            return bad("odd number of items for a dict");
        }
        let kind = self.nodes[dict].kind();
        match &mut self.nodes[dict] {
            Node::Dict(d) => {
                d.extend(kv.chunks(2).map(|c| (c[0], c[1])));
                Ok(())
            }
            _ => bad(format!("SETITEM(S) on a {kind}")),
        }
    }

    fn appends(&mut self, list: Id, items: Vec<Id>) -> StepResult<()> {
        let kind = self.nodes[list].kind();
        match &mut self.nodes[list] {
            Node::List(l) => {
                l.extend(items);
                Ok(())
            }
            _ => bad(format!("APPEND(S) on a {kind}")),
        }
    }

    /// One opcode; `Ok(true)` at STOP.
    fn step(&mut self, op: u8, r: &mut Bytes) -> StepResult<bool> {
        match op {
            0x80 => {
                r.u8("PROTO version")?;
            }
            0x95 => {
                // FRAME: a length hint, the frame's bytes follow inline
                r.take(8, "FRAME length")?;
            }
            b'.' => return Ok(true),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let id = self.top()?;
                self.stack.push(id);
            }
            b'N' => self.push(Node::None)?,
            0x88 => self.push(Node::Bool(true))?,
            0x89 => self.push(Node::Bool(false))?,
            b'J' => {
                let v = i32::from_le_bytes(r.array("BININT")?);
                self.push(Node::Int(v as i64))?
            }
            b'K' => {
                let v = r.u8("BININT1")?;
                self.push(Node::Int(v as i64))?
            }
            b'M' => {
                let v = u16::from_le_bytes(r.array("BININT2")?);
                self.push(Node::Int(v as i64))?
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    r.u8("LONG1 length")? as u64
                } else {
                    u32::from_le_bytes(r.array("LONG4 length")?) as u64
                };
                let b = r.take(n, "LONG bytes")?;
                if b.len() > 8 {
                    return bad(format!("integer of {} bytes", b.len()));
                }
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if let Some(&last) = b.last() {
                    if last & 0x80 != 0 && b.len() < 8 {
                        v -= 1i64 << (8 * b.len());
                    }
                }
                self.push(Node::Int(v))?
            }
            b'G' => {
                let v = f64::from_be_bytes(r.array("BINFLOAT")?);
                self.push(Node::Float(v))?
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => u32::from_le_bytes(r.array("BINUNICODE length")?) as u64,
                    0x8c => r.u8("SHORT_BINUNICODE length")? as u64,
                    _ => u64::from_le_bytes(r.array("BINUNICODE8 length")?),
                };
                let s = Self::string(r.take(n, "string")?)?;
                self.push(Node::Str(s))?
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e => {
                // BINSTRING, SHORT_BINSTRING, BINBYTES, SHORT_BINBYTES, BINBYTES8
                let n = match op {
                    b'T' | b'B' => u32::from_le_bytes(r.array("BINBYTES length")?) as u64,
                    b'U' | b'C' => r.u8("SHORT_BINBYTES length")? as u64,
                    _ => u64::from_le_bytes(r.array("BINBYTES8 length")?),
                };
                let b = r.take(n, "bytes")?;
                // Python 2 strings (BINSTRING) are text in old checkpoints
                let node = if op == b'T' || op == b'U' {
                    Node::Str(String::from_utf8_lossy(b).into_owned())
                } else {
                    Node::Bytes(b.len())
                };
                self.push(node)?
            }
            b')' => self.push(Node::Tuple(vec![]))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push(Node::Tuple(items))?
            }
            0x85 => {
                let a = self.pop()?;
                self.push(Node::Tuple(vec![a]))?
            }
            0x86 => {
                let b = self.pop()?;
                let a = self.pop()?;
                self.push(Node::Tuple(vec![a, b]))?
            }
            0x87 => {
                let c = self.pop()?;
                let b = self.pop()?;
                let a = self.pop()?;
                self.push(Node::Tuple(vec![a, b, c]))?
            }
            b']' => self.push(Node::List(vec![]))?,
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Node::List(items))?
            }
            b'a' => {
                let v = self.pop()?;
                let l = self.top()?;
                self.appends(l, vec![v])?
            }
            b'e' => {
                let items = self.pop_mark()?;
                let l = self.top()?;
                self.appends(l, items)?
            }
            b'}' => self.push(Node::Dict(vec![]))?,
            b'd' => {
                let kv = self.pop_mark()?;
                let id = self.new_node(Node::Dict(vec![]))?;
                self.setitems(id, kv)?;
                self.stack.push(id)
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let d = self.top()?;
                self.setitems(d, vec![k, v])?
            }
            b'u' => {
                let kv = self.pop_mark()?;
                let d = self.top()?;
                self.setitems(d, kv)?
            }
            b'c' => {
                let module = Self::string(r.line("GLOBAL module")?)?;
                let name = Self::string(r.line("GLOBAL name")?)?;
                self.push(Node::Global { module, name })?
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (&self.nodes[module], &self.nodes[name]) {
                    (Node::Str(m), Node::Str(n)) => {
                        let g = Node::Global { module: m.clone(), name: n.clone() };
                        self.push(g)?
                    }
                    _ => return bad("STACK_GLOBAL needs two strings"),
                }
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                // an OrderedDict (a state_dict) is filled by SETITEMS next
                let node = match &self.nodes[callable] {
                    Node::Global { module, name }
                        if module == "collections" && (name == "OrderedDict" || name == "defaultdict") =>
                    {
                        Node::Dict(vec![])
                    }
                    _ => Node::Reduce { callable, args },
                };
                self.push(node)?
            }
            b'b' => {
                let state = self.pop()?;
                let obj = self.pop()?;
                // a dict's state is its attributes (`_metadata`): not entries
                let node = match self.nodes[obj] {
                    Node::Dict(_) => {
                        self.stack.push(obj);
                        return Ok(false);
                    }
                    _ => Node::Build { obj, state },
                };
                self.push(node)?
            }
            b'Q' => {
                let id = self.pop()?;
                self.push(Node::PersId(id))?
            }
            b'q' => {
                let k = r.u8("BINPUT index")? as u32;
                self.memo_put(k)?
            }
            b'r' => {
                let k = u32::from_le_bytes(r.array("LONG_BINPUT index")?);
                self.memo_put(k)?
            }
            0x94 => {
                let k = u32::try_from(self.memo.len()).map_err(|_| Step::Bad("memo full".into()))?;
                self.memo_put(k)?
            }
            b'h' => {
                let k = r.u8("BINGET index")? as u32;
                self.memo_get(k)?
            }
            b'j' => {
                let k = u32::from_le_bytes(r.array("LONG_BINGET index")?);
                self.memo_get(k)?
            }
            _ => return bad("unknown or unsupported opcode"),
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn run(bytes: &[u8]) -> Result<Pickle> {
        load(&mut Bytes::new(Path::new("t.pkl"), bytes))
    }

    #[test]
    fn memo_fetch_shares_instead_of_copying() {
        // L0 = []; Lk = [L(k-1), L(k-1)] for 64 levels: 2^64 leaves if copied
        let mut p = vec![0x80, 2, b']', b'q', 0];
        for k in 1..=64u8 {
            p.extend([b'h', k - 1, b'h', k - 1, 0x86, b'q', k]);
        }
        p.push(b'.');
        let pk = run(&p).unwrap();
        assert!(pk.nodes.len() < 200, "{} nodes", pk.nodes.len());
    }

    #[test]
    fn appends_are_seen_through_the_memo() {
        // l = []; memo[0] = l; l.append(1); push memo[0]; tuple (l, l)
        let p = [0x80, 2, b']', b'q', 0, b'K', 1, b'a', b'h', 0, 0x86, b'.'];
        let pk = run(&p).unwrap();
        let items = pk.items(pk.root).unwrap();
        assert_eq!(items[0], items[1]);
        assert_eq!(pk.items(items[0]).unwrap().len(), 1);
    }

    #[test]
    fn lengths_past_the_end_are_truncation_errors() {
        let p = [0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a'];
        let e = run(&p).unwrap_err().to_string();
        assert!(e.contains("t.pkl") && e.contains("truncated") && e.contains("4294967295"), "{e}");
    }

    #[test]
    fn deep_nesting_is_flat() {
        // 200,000 nested lists: built and dropped without recursion
        let mut p = vec![0x80, 2];
        p.extend(std::iter::repeat_n(b']', 200_000));
        p.extend(std::iter::repeat_n(b'a', 199_999));
        p.push(b'.');
        let pk = run(&p).unwrap();
        assert_eq!(pk.nodes.len(), 200_000);
    }

    #[test]
    fn stack_underflow_and_bad_marks_are_errors() {
        for p in [&[0x80, 2, b'a', b'.'][..], b"(0.", b"u.", b".", &[0xff]] {
            let e = run(p).unwrap_err().to_string();
            assert!(e.contains("t.pkl") && e.contains("pickle"), "{e}");
        }
    }
}
