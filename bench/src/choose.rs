//! Picking named things (subjects, states) from a command line's comma-separated list.

use anyhow::{Result, bail};

/// The items of `all` that `names` lists, in the list's order; all of them without a list. An
/// unknown name is an error that says what the choices are.
pub fn by_name<T: Copy>(
    all: &[T],
    names: Option<&[String]>,
    name: impl Fn(T) -> &'static str,
    what: &str,
) -> Result<Vec<T>> {
    let Some(names) = names else {
        return Ok(all.to_vec());
    };
    names
        .iter()
        .map(
            |wanted| match all.iter().find(|&&item| name(item) == wanted) {
                Some(&item) => Ok(item),
                None => {
                    let choices: Vec<&str> = all.iter().map(|&item| name(item)).collect();
                    bail!("unknown {what} {wanted} (one of: {})", choices.join(", "))
                }
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_in_the_lists_order_and_names_the_choices_on_a_typo() {
        let all = ["a", "b", "c"];
        let name = |s: &'static str| s;
        assert_eq!(by_name(&all, None, name, "x").expect("all"), all.to_vec());
        let picked = by_name(&all, Some(&["c".into(), "a".into()]), name, "x").expect("two");
        assert_eq!(picked, vec!["c", "a"]);
        let err = by_name(&all, Some(&["d".into()]), name, "subject").expect_err("unknown");
        assert_eq!(err.to_string(), "unknown subject d (one of: a, b, c)");
    }
}
