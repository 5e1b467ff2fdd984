//! The real cloud's known and likely behaviours that the API reference leaves out, as
//! settings (see `shared/lunanode-api.md`): which bus `target=auto` attaches on, the two
//! status vocabularies, the pre-2018 `region` rules, and lists sent as objects.
//!
//! Two behaviours are not settings because the real cloud is known to have them: a `req`
//! with non-ASCII bytes fails the signature check, and `image/delete` of an image that does
//! not exist succeeds.

use std::fmt;
use std::str::FromStr;

/// Which of the real cloud's undocumented behaviours the simulator plays.
///
/// Parsed from a comma-separated list of [`Quirks::NAMES`], `likely`, `none`, and `no-NAME`
/// (turns one off), applied left to right from nothing: `likely,object-lists` is the likely
/// preset plus object lists, `likely,no-list-words` is the preset without list words.
/// The default is [`Quirks::LIKELY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Quirks {
    /// `ide-auto`: a VM created without a bus has IDE disks, so `target=auto` attaches the
    /// volume on IDE (no `virtio-` link). Off: on virtio.
    pub ide_auto: bool,
    /// `list-words`: `volume/list` says `active` for a volume `volume/info` reports as
    /// `available` or `in-use` (transitional statuses are the same in both).
    pub list_words: bool,
    /// `old-rules`: the pre-2018 rules, where `volume/list`, `info`, `attach`, `detach`,
    /// `extend`, `delete` and `snapshot-create` answer `region not set` without `region`,
    /// and refuse a region the volume is not in.
    pub old_rules: bool,
    /// `object-lists`: every list field (`volumes`, `snapshots`, `images`, `vms`) is a
    /// JSON object keyed `"0"`, `"1"`, … in order instead of an array.
    pub object_lists: bool,
}

impl Quirks {
    /// The real cloud's likeliest behaviour: `ide-auto` and `list-words`.
    pub const LIKELY: Quirks = Quirks {
        ide_auto: true,
        list_words: true,
        old_rules: false,
        object_lists: false,
    };

    /// None of the quirks: the API reference taken literally.
    pub const NONE: Quirks = Quirks {
        ide_auto: false,
        list_words: false,
        old_rules: false,
        object_lists: false,
    };

    /// Every quirk.
    pub const ALL: Quirks = Quirks {
        ide_auto: true,
        list_words: true,
        old_rules: true,
        object_lists: true,
    };

    /// The names of the quirks, in the order they are shown.
    pub const NAMES: [&'static str; 4] = ["ide-auto", "list-words", "old-rules", "object-lists"];

    fn flag(&mut self, name: &str) -> Option<&mut bool> {
        match name {
            "ide-auto" => Some(&mut self.ide_auto),
            "list-words" => Some(&mut self.list_words),
            "old-rules" => Some(&mut self.old_rules),
            "object-lists" => Some(&mut self.object_lists),
            _ => None,
        }
    }

    fn get(&self, name: &str) -> bool {
        let mut q = *self;
        q.flag(name).is_some_and(|f| *f)
    }

    /// The names of the quirks that are on.
    pub fn names(&self) -> Vec<&'static str> {
        Self::NAMES.into_iter().filter(|n| self.get(n)).collect()
    }
}

impl Default for Quirks {
    /// [`Quirks::LIKELY`].
    fn default() -> Self {
        Quirks::LIKELY
    }
}

impl FromStr for Quirks {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut q = Quirks::NONE;
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let item = item.to_ascii_lowercase();
            match item.as_str() {
                "likely" => {
                    q.ide_auto |= Quirks::LIKELY.ide_auto;
                    q.list_words |= Quirks::LIKELY.list_words;
                    q.old_rules |= Quirks::LIKELY.old_rules;
                    q.object_lists |= Quirks::LIKELY.object_lists;
                }
                "none" => q = Quirks::NONE,
                "all" => q = Quirks::ALL,
                name => {
                    let (name, on) = match name.strip_prefix("no-") {
                        Some(n) => (n, false),
                        None => (name, true),
                    };
                    match q.flag(name) {
                        Some(f) => *f = on,
                        None => {
                            return Err(format!(
                                "unknown quirk {item:?} (known: {}, likely, none, all; no-NAME turns one off)",
                                Quirks::NAMES.join(", ")
                            ));
                        }
                    }
                }
            }
        }
        Ok(q)
    }
}

impl fmt::Display for Quirks {
    /// The quirks that are on, comma-separated (`none` when none is); parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_likely_preset() {
        assert_eq!(Quirks::default(), Quirks::LIKELY);
        let q = Quirks::default();
        assert!(q.ide_auto && q.list_words && !q.old_rules && !q.object_lists);
        assert_eq!(q.to_string(), "ide-auto,list-words");
    }

    #[test]
    fn lists_parse_left_to_right() {
        let p = |s: &str| s.parse::<Quirks>().unwrap();
        assert_eq!(p("likely"), Quirks::LIKELY);
        assert_eq!(p("none"), Quirks::NONE);
        assert_eq!(p(""), Quirks::NONE);
        assert_eq!(p("all"), Quirks::ALL);
        assert_eq!(p("ide-auto,list-words"), Quirks::LIKELY);
        let q = p("likely, Object-Lists");
        assert!(q.ide_auto && q.list_words && q.object_lists && !q.old_rules);
        let q = p("likely,no-list-words");
        assert!(q.ide_auto && !q.list_words);
        assert_eq!(
            p("old-rules"),
            Quirks {
                old_rules: true,
                ..Quirks::NONE
            }
        );
        assert_eq!(p("all,none,object-lists").names(), ["object-lists"]);
        for q in [Quirks::NONE, Quirks::LIKELY, Quirks::ALL, p("old-rules")] {
            assert_eq!(p(&q.to_string()), q);
        }
        let e = "ide-auto,floppy".parse::<Quirks>().unwrap_err();
        assert!(e.contains("floppy") && e.contains("object-lists"), "{e}");
        assert!("no-likely".parse::<Quirks>().is_err());
    }
}
