//! A dataset seen through a model's tasks: its labels matched to the
//! model's classes by name, so data whose classes are listed in another
//! order, or are a subset of the model's (a test set where the digit 0 is
//! never the largest has a `max` task of nine classes), is scored right.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::{Dataset, Sample, TaskSpec};

/// `data` with its tasks and labels expressed in `model`'s tasks: each of
/// the model's tasks must be one of the data's (same name, same kind), and
/// each class name of the data's task one of the model's. Returns `data`
/// itself when nothing needs mapping.
pub fn by_name(data: Arc<dyn Dataset>, model: &[TaskSpec]) -> Result<Arc<dyn Dataset>> {
    let theirs = data.tasks();
    let mut maps = Vec::with_capacity(model.len());
    for mine in model {
        // A single-task dataset's one task answers a single-task model's
        // under any name (both are `class` unless a CSV named it).
        let found = if model.len() == 1 && theirs.len() == 1 {
            Some((0, &theirs[0]))
        } else {
            theirs.iter().enumerate().find(|(_, t)| t.name == mine.name)
        };
        let Some((index, task)) = found else {
            bail!(
                "the model answers the task `{}`, which {} does not have (its tasks: {})",
                mine.name,
                data.describe(),
                names(&theirs)
            );
        };
        if task.multi_label != mine.multi_label {
            bail!(
                "task `{}` is {} in the model but {} in {}",
                mine.name,
                kind(mine),
                kind(task),
                data.describe()
            );
        }
        let classes = task
            .class_names
            .iter()
            .map(|c| {
                mine.class_names.iter().position(|m| m == c).ok_or_else(|| {
                    anyhow::anyhow!(
                        "the classes differ: class `{c}` of task `{}` in {} is not one of the model's {} classes ({})",
                        mine.name,
                        data.describe(),
                        mine.num_classes(),
                        mine.class_names.join(", ")
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        maps.push(TaskMap {
            index,
            classes,
            multi_label: mine.multi_label,
        });
    }
    let identity = theirs.len() == model.len()
        && maps
            .iter()
            .enumerate()
            .all(|(i, m)| m.index == i && m.classes.iter().enumerate().all(|(a, &b)| a == b));
    if identity && (model.len() == 1 || theirs == model) {
        return Ok(data);
    }
    Ok(Arc::new(Relabelled {
        data,
        tasks: model.to_vec(),
        maps,
    }))
}

fn names(tasks: &[TaskSpec]) -> String {
    tasks
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn kind(t: &TaskSpec) -> &'static str {
    if t.multi_label {
        "multi-label"
    } else {
        "single-label"
    }
}

/// Where one of the model's tasks is in the data, and its classes there.
struct TaskMap {
    index: usize,
    /// The model's class of each of the data's classes.
    classes: Vec<usize>,
    multi_label: bool,
}

impl TaskMap {
    fn map(&self, label: usize) -> usize {
        if self.multi_label {
            (0..self.classes.len())
                .filter(|k| label >> k & 1 == 1)
                .map(|k| 1 << self.classes[k])
                .sum()
        } else {
            self.classes[label]
        }
    }
}

struct Relabelled {
    data: Arc<dyn Dataset>,
    tasks: Vec<TaskSpec>,
    maps: Vec<TaskMap>,
}

impl Dataset for Relabelled {
    fn len(&self) -> usize {
        self.data.len()
    }
    fn num_classes(&self) -> usize {
        self.tasks[0].num_classes()
    }
    fn class_names(&self) -> Vec<String> {
        self.tasks[0].class_names.clone()
    }
    fn tasks(&self) -> Vec<TaskSpec> {
        self.tasks.clone()
    }
    fn channels(&self) -> usize {
        self.data.channels()
    }
    fn image_size(&self) -> (usize, usize) {
        self.data.image_size()
    }
    fn proxy_shape(&self) -> (usize, usize) {
        self.data.proxy_shape()
    }
    fn get(&self, i: usize) -> Result<Sample> {
        let s = self.data.get(i)?;
        let labels = self.maps.iter().map(|m| m.map(s.labels[m.index])).collect();
        Ok(Sample { labels, ..s })
    }
    fn describe(&self) -> String {
        format!(
            "{} (classes matched to the model's by name)",
            self.data.describe()
        )
    }
    fn object_centres(&self, i: usize) -> Option<Vec<[f32; 2]>> {
        self.data.object_centres(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::InMemoryImage;

    /// Two images, tasks `max` (classes "1", "2", "3") and `set` (multi-label
    /// over "a", "b").
    struct Two;

    impl Dataset for Two {
        fn len(&self) -> usize {
            2
        }
        fn num_classes(&self) -> usize {
            3
        }
        fn class_names(&self) -> Vec<String> {
            self.tasks()[0].class_names.clone()
        }
        fn tasks(&self) -> Vec<TaskSpec> {
            let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
            vec![
                TaskSpec::single("max", names(&["1", "2", "3"])),
                TaskSpec {
                    name: "set".into(),
                    class_names: names(&["a", "b"]),
                    multi_label: true,
                },
            ]
        }
        fn channels(&self) -> usize {
            1
        }
        fn image_size(&self) -> (usize, usize) {
            (1, 1)
        }
        fn proxy_shape(&self) -> (usize, usize) {
            (1, 1)
        }
        fn get(&self, i: usize) -> Result<Sample> {
            Ok(Sample {
                image: Arc::new(InMemoryImage::new(vec![0.0], 1, 1, 1, 1)?),
                proxy: vec![0.0],
                labels: vec![i + 1, 0b10 >> i],
            })
        }
        fn describe(&self) -> String {
            "two".into()
        }
    }

    fn task(name: &str, classes: &[&str], multi_label: bool) -> TaskSpec {
        TaskSpec {
            name: name.into(),
            class_names: classes.iter().map(|s| s.to_string()).collect(),
            multi_label,
        }
    }

    /// The model lists the tasks in another order, `max` with a class the
    /// data never has ("0") and `set`'s classes reversed: every label is
    /// mapped by name. A class the model lacks, a missing task or a task of
    /// the other kind is refused, naming it.
    #[test]
    fn labels_are_matched_to_the_models_classes_by_name() {
        let model = [
            task("set", &["b", "a"], true),
            task("max", &["0", "1", "2", "3"], false),
        ];
        let d = by_name(Arc::new(Two), &model).unwrap();
        assert_eq!(d.tasks(), model.to_vec());
        // Image 0: max "2" (index 1), set {b}; image 1: max "3", set {a}.
        assert_eq!(d.get(0).unwrap().labels, vec![0b01, 2]);
        assert_eq!(d.get(1).unwrap().labels, vec![0b10, 3]);
        let same = Two.tasks();
        let d = by_name(Arc::new(Two), &same).unwrap();
        assert_eq!(d.describe(), "two", "nothing to map: the data itself");

        for (bad, needle) in [
            (vec![task("max", &["1", "2"], false)], "class `3` of task `max`"),
            (vec![task("top", &["1", "2", "3"], false)], "does not have"),
            (
                vec![
                    task("max", &["1", "2", "3"], true),
                    task("set", &["a", "b"], true),
                ],
                "multi-label in the model",
            ),
        ] {
            let err = by_name(Arc::new(Two), &bad).err().unwrap().to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}
