//! The demo's synthetic world: arithmetic questions with answers in several styles.
//! Preferred = polite and correct; dispreferred = rude, terse or wrong. SFT data mixes all
//! styles (so the starting policy says both kinds of thing); preference data pairs a
//! preferred answer with a dispreferred one for the same question.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const ASK: &[&str] = &[
    "Q: what is {a} {op} {b}?",
    "Q: compute {a} {op} {b}.",
    "Q: quick one, {a} {op} {b}?",
    "Q: {a} {op} {b} = ?",
];
const POLITE: &[&str] = &[
    " Sure! {a} {op} {b} = {c}.",
    " Happy to help: {a} {op} {b} = {c}.",
    " Good question! {a} {op} {b} equals {c}.",
    " Of course. The answer is {c}.",
];
const RUDE: &[&str] = &[
    " Obviously {c}.",
    " Ugh, {c}.",
    " Figure it out yourself. {c}.",
    " Whatever, {c}.",
];
const TERSE: &[&str] = &[" {c}", " {a} {op} {b} = {c}."];

/// One question: its text and the operands.
pub struct Question {
    pub prompt: String,
    a: i64,
    op: &'static str,
    b: i64,
}

fn fill(t: &str, q: &Question, c: i64) -> String {
    t.replace("{a}", &q.a.to_string())
        .replace("{op}", q.op)
        .replace("{b}", &q.b.to_string())
        .replace("{c}", &c.to_string())
}

impl Question {
    pub fn random(rng: &mut StdRng) -> Self {
        let op = ["+", "-"][rng.gen_range(0..2)];
        let (a, b) = (rng.gen_range(0..10), rng.gen_range(0..10));
        let template = ASK[rng.gen_range(0..ASK.len())];
        let mut q = Question {
            prompt: String::new(),
            a,
            op,
            b,
        };
        q.prompt = fill(template, &q, 0);
        q
    }

    fn answer(&self) -> i64 {
        if self.op == "+" {
            self.a + self.b
        } else {
            self.a - self.b
        }
    }

    fn wrong(&self, rng: &mut StdRng) -> i64 {
        self.answer() + [-2, -1, 1, 2][rng.gen_range(0..4)]
    }

    pub fn polite(&self, rng: &mut StdRng) -> String {
        fill(
            POLITE.choose(rng).unwrap_or(&POLITE[0]),
            self,
            self.answer(),
        )
    }

    /// A dispreferred answer: rude, terse, or politely wrong.
    pub fn bad(&self, rng: &mut StdRng) -> String {
        match rng.gen_range(0..4) {
            0 | 1 => fill(RUDE.choose(rng).unwrap_or(&RUDE[0]), self, self.answer()),
            2 => fill(
                TERSE.choose(rng).unwrap_or(&TERSE[0]),
                self,
                self.wrong(rng),
            ),
            _ => fill(
                POLITE.choose(rng).unwrap_or(&POLITE[0]),
                self,
                self.wrong(rng),
            ),
        }
    }
}

/// Data sets of the demo world, all JSONL rows.
pub struct World {
    pub sft: Vec<Value>,
    pub pref_train: Vec<Value>,
    pub pref_test: Vec<Value>,
    pub corpus: Vec<String>,
}

/// `n_sft` SFT rows (half preferred style, half dispreferred), `n_pref` training pairs and
/// `n_test` held-out pairs.
pub fn build(seed: u64, n_sft: usize, n_pref: usize, n_test: usize) -> World {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sft = Vec::with_capacity(n_sft);
    let mut corpus = Vec::new();
    for _ in 0..n_sft {
        let q = Question::random(&mut rng);
        let completion = if rng.gen_bool(0.5) {
            q.polite(&mut rng)
        } else {
            q.bad(&mut rng)
        };
        corpus.push(format!("{}{}", q.prompt, completion));
        sft.push(json!({"prompt": q.prompt, "completion": completion}));
    }
    let mut pairs = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|_| {
                let q = Question::random(&mut rng);
                json!({"prompt": q.prompt, "chosen": q.polite(&mut rng), "rejected": q.bad(&mut rng)})
            })
            .collect()
    };
    let pref_train = pairs(n_pref);
    let pref_test = pairs(n_test);
    World {
        sft,
        pref_train,
        pref_test,
        corpus,
    }
}
