//! What `saccade data import` takes: the image files, their labels (one per
//! task) and, where given, their splits. Either one class per subfolder
//! ([`from_folders`]) or a labels CSV ([`from_csv`], format in
//! [`LABELS_HELP`]).
//!
//! A CSV task is multi-label when any of its cells holds other than one
//! name: two or more, or none, since an empty cell means "no class
//! present", which only a multi-label task can say. A task made
//! multi-label by empty cells alone gets a note, in case those are missing
//! labels.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use super::decode::{has_image_ext, IMAGE_KINDS};
use super::{Split, TaskSpec, DEFAULT_TASK, MAX_MULTI_LABEL_CLASSES};

/// The labels CSV format, for `--help` texts.
pub const LABELS_HELP: &str = "\
Labels CSV (--labels): a header, then one row per image, e.g.
  file,split,majority,multi
  a/0001.png,train,5,0 5 8
  a/0002.png,test,3,
  file   the image's path relative to --folder; each image once
  split  optional: train, valid or test (without it, --valid-frac/--test-frac place each image)
  other  one column per task: a class name, or for a multi-label task the names of the classes
         present separated by spaces (empty: none). A task is multi-label when any of its cells
         holds two or more names or none. Class names have no spaces; they are ordered as numbers
         when all are integers, else as strings. A multi-label task has at most 64 classes.
Errors name the CSV's line and column; the import writes nothing then (exit 2).";

/// One image to import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub path: PathBuf,
    /// The path as listed, relative to the folder: what the split fractions hash.
    pub rel: String,
    /// One per task (a multi-label task's: the bitmask of its classes).
    pub labels: Vec<usize>,
    /// Given by the CSV's `split` column; else the fractions decide.
    pub split: Option<Split>,
}

/// The tasks and images of an import.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub tasks: Vec<TaskSpec>,
    pub images: Vec<Listed>,
    /// What the user may want to check (a task made multi-label by empty
    /// cells alone), to print.
    pub notes: Vec<String>,
}

/// The entries of folder `d`, sorted by name, without hidden ones (`.git`,
/// `.DS_Store`).
fn visible_entries(d: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(d)
        .with_context(|| format!("cannot read folder {}", d.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    v.retain(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    });
    v.sort();
    Ok(v)
}

/// The image files under `dir`, in its subfolders too, sorted; other files
/// go to `skipped`.
fn images_under(dir: &Path, skipped: &mut Vec<PathBuf>) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for path in visible_entries(dir)? {
        if path.is_dir() {
            found.extend(images_under(&path, skipped)?);
        } else if has_image_ext(&path) {
            found.push(path);
        } else {
            skipped.push(path);
        }
    }
    Ok(found)
}

/// The images of `folder`, one class per subfolder (sorted by name), found
/// in the class folder's subfolders too (torchvision's `ImageFolder`): one
/// task named [`DEFAULT_TASK`]. Hidden folders and files are left out;
/// class folders without images and files of other kinds are left out with
/// a note.
pub fn from_folders(folder: &Path) -> Result<Listing> {
    let classes: Vec<PathBuf> = visible_entries(folder)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    ensure!(
        !classes.is_empty(),
        "{} has no subfolders: put each class's images in its own subfolder, or list them in a \
         labels CSV (--labels)",
        folder.display()
    );
    let mut notes = Vec::new();
    let mut names = Vec::new();
    let mut images = Vec::new();
    let mut skipped = Vec::new();
    for dir in &classes {
        // Class names are lines of the tab-separated manifest.
        let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
        ensure!(
            !name.chars().any(char::is_control),
            "class folder {:?} has a tab, newline or other control character in its name: rename it",
            dir.display()
        );
        let found = images_under(dir, &mut skipped)?;
        if found.is_empty() {
            notes.push(format!(
                "class folder {} holds no images: not a class of this store",
                dir.display()
            ));
            continue;
        }
        let label = names.len();
        names.push(name);
        images.extend(found.into_iter().map(|path| {
            Listed {
                rel: path
                    .strip_prefix(folder)
                    .unwrap_or(&path)
                    .to_string_lossy()
                    .to_string(),
                path,
                labels: vec![label],
                split: None,
            }
        }));
    }
    ensure!(
        !images.is_empty(),
        "no {IMAGE_KINDS} images under {}",
        folder.display()
    );
    if let Some(first) = skipped.first() {
        notes.push(format!(
            "{} files that are not {IMAGE_KINDS} images left out, such as {}",
            skipped.len(),
            first.display()
        ));
    }
    Ok(Listing {
        tasks: vec![TaskSpec::single(DEFAULT_TASK, names)],
        images,
        notes,
    })
}

/// A row of the CSV: its line, image, split and class names per task.
struct Row {
    line: u64,
    listed: Listed,
    names: Vec<Vec<String>>,
}

/// The images listed by the labels CSV at `csv`, paths relative to `folder`
/// (format in the module doc). Every error names the CSV file, the line and
/// the column.
pub fn from_csv(csv: &Path, folder: &Path) -> Result<Listing> {
    let at = |line: u64, column: &str| format!("{} line {line}, column `{column}`", csv.display());
    let bytes = crate::files::read_regular(csv)
        .with_context(|| format!("cannot read labels file {}", csv.display()))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes.as_slice());
    // A record's position is where reading it began, before the empty
    // lines the reader skips: its line is after those.
    let line_of = |record: &csv::StringRecord| {
        let pos = record
            .position()
            .expect("records read from a reader have positions");
        let skipped = bytes[pos.byte() as usize..]
            .iter()
            .take_while(|&&b| b == b'\n' || b == b'\r')
            .filter(|&&b| b == b'\n')
            .count();
        pos.line() + skipped as u64
    };
    let mut records = reader.records();
    let header = records
        .next()
        .transpose()
        .with_context(|| format!("cannot read labels file {}", csv.display()))?
        .with_context(|| {
            format!(
                "{} is empty: its first line must be a header `file,<task>,...`",
                csv.display()
            )
        })?;
    // Blank lines before it are skipped.
    let head = line_of(&header);
    let columns: Vec<&str> = header.iter().collect();
    for (i, name) in columns.iter().enumerate() {
        ensure!(
            !name.is_empty(),
            "{} line {head}, column {}: empty column name; name every column (`file`, `split` or a task)",
            csv.display(),
            i + 1
        );
        ensure!(
            !name.chars().any(char::is_control),
            "{} line {head}, column {}: the name {name:?} has a tab, newline or other control character; \
             rename it",
            csv.display(),
            i + 1
        );
        if let Some(j) = columns[..i].iter().position(|c| c == name) {
            bail!(
                "{} line {head}: columns {} and {} are both named `{name}`; give each column its own name",
                csv.display(),
                j + 1,
                i + 1
            );
        }
    }
    let file_col = columns.iter().position(|&c| c == "file").with_context(|| {
        format!(
            "{} line {head}: no `file` column; the header must name one (`file,<task>,...`) holding each \
             image's path relative to {}",
            csv.display(),
            folder.display()
        )
    })?;
    let split_col = columns.iter().position(|&c| c == "split");
    let task_cols: Vec<usize> = (0..columns.len())
        .filter(|&i| i != file_col && Some(i) != split_col)
        .collect();
    ensure!(
        !task_cols.is_empty(),
        "{} line {head}: no task column; add a column of class names per task after `file`",
        csv.display()
    );

    let mut first_line: HashMap<PathBuf, u64> = HashMap::new();
    let mut rows = Vec::new();
    for record in records {
        let record = record.with_context(|| format!("cannot read labels file {}", csv.display()))?;
        let line = line_of(&record);
        if record.len() != columns.len() {
            let which = match columns.get(record.len()) {
                Some(c) => format!("no cell for column `{c}`"),
                None => format!("cells past the last column `{}`", columns[columns.len() - 1]),
            };
            bail!(
                "{} line {line}: {} cells but the header has {} columns ({which}); give every row one \
                 cell per column (quote a cell that holds a comma)",
                csv.display(),
                record.len(),
                columns.len()
            );
        }
        let rel = &record[file_col];
        ensure!(!rel.is_empty(), "{}: empty file name", at(line, "file"));
        let path = folder.join(rel);
        let real = fs::canonicalize(&path)
            .ok()
            .filter(|p| p.is_file())
            .with_context(|| {
                format!(
                    "{}: no file {}; fix the path (relative to {})",
                    at(line, "file"),
                    path.display(),
                    folder.display()
                )
            })?;
        if let Some(first) = first_line.insert(real, line) {
            bail!(
                "{}: `{rel}` is listed twice (first on line {first}); list each image once",
                at(line, "file")
            );
        }
        let split = match split_col {
            Some(i) => {
                Some(Split::parse(&record[i]).map_err(|e| anyhow::anyhow!("{}: {e}", at(line, "split")))?)
            }
            None => None,
        };
        let mut names = Vec::with_capacity(task_cols.len());
        for &i in &task_cols {
            let mut cell: Vec<String> = Vec::new();
            for name in record[i].split_whitespace() {
                ensure!(
                    !name.chars().any(char::is_control),
                    "{}: the class name {name:?} has a control character; remove it",
                    at(line, columns[i])
                );
                if !cell.iter().any(|c| c == name) {
                    cell.push(name.to_string());
                }
            }
            names.push(cell);
        }
        rows.push(Row {
            line,
            listed: Listed {
                path,
                rel: rel.to_string(),
                labels: Vec::with_capacity(task_cols.len()),
                split,
            },
            names,
        });
    }
    ensure!(
        !rows.is_empty(),
        "{} has a header but no image rows",
        csv.display()
    );

    let mut tasks = Vec::new();
    let mut notes = Vec::new();
    for (k, &col) in task_cols.iter().enumerate() {
        let name = columns[col];
        let cells = || rows.iter().map(|r| (r.line, &r.names[k]));
        let multi_label = cells().any(|(_, c)| c.len() != 1);
        // The classes in order of appearance, and where a multi-label task
        // first has too many.
        let mut classes: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for (line, cell) in cells() {
            for c in cell {
                if seen.insert(c) {
                    classes.push(c.clone());
                    ensure!(
                        !multi_label || classes.len() <= MAX_MULTI_LABEL_CLASSES,
                        "{}: class `{c}` is the {}th of multi-label task `{name}`, over the {} a \
                         multi-label task may have; merge classes or make it single-label (one class \
                         per cell)",
                        at(line, name),
                        classes.len(),
                        MAX_MULTI_LABEL_CLASSES
                    );
                }
            }
        }
        ensure!(
            !classes.is_empty(),
            "{}: every cell is empty; a task needs at least one class (or remove the column)",
            at(head, name)
        );
        if multi_label && cells().all(|(_, c)| c.len() <= 1) {
            let (line, _) = cells()
                .find(|(_, c)| c.is_empty())
                .expect("a cell of other than one name");
            notes.push(format!(
                "task `{name}` is multi-label only because some cells are empty (the first at {}); \
                 if those are missing labels, fill them in",
                at(line, name)
            ));
        }
        sort_classes(&mut classes);
        let indices: HashMap<&str, usize> =
            classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
        let index = |c: &String| indices[c.as_str()];
        for row in &mut rows {
            let label = if multi_label {
                row.names[k].iter().fold(0, |bits, c| bits | 1 << index(c))
            } else {
                index(&row.names[k][0])
            };
            row.listed.labels.push(label);
        }
        tasks.push(TaskSpec {
            name: name.to_string(),
            class_names: classes,
            multi_label,
        });
    }
    Ok(Listing {
        tasks,
        images: rows.into_iter().map(|r| r.listed).collect(),
        notes,
    })
}

/// As numbers when every name is an integer (`2` before `10`), else as strings.
fn sort_classes(names: &mut [String]) {
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_cached_key(|n| (n.parse::<i64>().unwrap_or_default(), n.clone()));
    } else {
        names.sort_unstable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder holding (empty) files at `files` and `labels.csv` with `text`.
    fn folder(files: &[&str], text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let path = dir.path().join(f);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, b"").unwrap();
        }
        fs::write(dir.path().join("labels.csv"), text).unwrap();
        dir
    }

    fn read(dir: &tempfile::TempDir) -> Result<Listing> {
        from_csv(&dir.path().join("labels.csv"), dir.path())
    }

    #[test]
    fn a_csv_gives_tasks_labels_and_splits() {
        let dir = folder(
            &["a.png", "b/c.png", "d.png"],
            // A byte order mark, as spreadsheets write, and spaces are ignored.
            "\u{feff}file, split ,digit,shape,tags\n\
             a.png,train,10,circle,\"3 1\"\n\
             b/c.png,test,2,square,\n\
             \n\
             d.png,valid,9,circle,2 2\n",
        );
        let got = read(&dir).unwrap();
        let task = |name: &str, classes: &[&str], multi_label| TaskSpec {
            name: name.into(),
            class_names: classes.iter().map(|c| c.to_string()).collect(),
            multi_label,
        };
        assert_eq!(
            got.tasks,
            [
                // Integers in numeric order, other names as strings.
                task("digit", &["2", "9", "10"], false),
                task("shape", &["circle", "square"], false),
                task("tags", &["1", "2", "3"], true),
            ]
        );
        let rows: Vec<_> = got
            .images
            .iter()
            .map(|l| (l.rel.as_str(), l.labels.clone(), l.split))
            .collect();
        assert_eq!(
            rows,
            [
                ("a.png", vec![2, 0, 0b101], Some(Split::Train)),
                ("b/c.png", vec![0, 1, 0], Some(Split::Test)),
                ("d.png", vec![1, 0, 0b010], Some(Split::Valid)),
            ]
        );
        assert_eq!(got.images[1].path, dir.path().join("b/c.png"));
        assert!(got.notes.is_empty(), "{:?}", got.notes);
    }

    #[test]
    fn without_a_split_column_the_fractions_decide_and_empty_cells_get_a_note() {
        let dir = folder(
            &["a.png", "b.png", "c.png"],
            "file,kind,defect\na.png,10,x\nb.png,2,\nc.png,x,y\n",
        );
        let got = read(&dir).unwrap();
        assert!(got.images.iter().all(|l| l.split.is_none()));
        // One name that is not an integer: all ordered as strings.
        assert_eq!(got.tasks[0].class_names, ["10", "2", "x"]);
        assert!(!got.tasks[0].multi_label && got.tasks[1].multi_label);
        assert_eq!(got.images[1].labels, [1, 0]);
        assert_eq!(got.notes.len(), 1);
        assert!(
            got.notes[0].contains("`defect` is multi-label only because")
                && got.notes[0].contains("line 3, column `defect`"),
            "{}",
            got.notes[0]
        );
    }

    /// Each bad input is refused, naming the CSV file, line and column.
    #[test]
    fn csv_errors_name_the_line_and_column() {
        let many: Vec<String> = (0..=MAX_MULTI_LABEL_CLASSES).map(|c| format!("c{c}")).collect();
        let many = format!("file,tags\na.png,c0\nb.png,{}\n", many.join(" "));
        for (text, needles) in [
            (
                "file,split,digit\na.png,tst,1\n",
                &["labels.csv line 2, column `split`", "unknown split `tst`"][..],
            ),
            (
                "file,digit\na.png,1\nnope.png,2\n",
                &["labels.csv line 3, column `file`", "no file", "nope.png"],
            ),
            (
                "file,digit\na.png,1\nb.png,1\n./a.png,2\n",
                &[
                    "labels.csv line 4, column `file`",
                    "`./a.png` is listed twice (first on line 2)",
                ],
            ),
            (
                "file,split,digit\na.png,train\n",
                &["labels.csv line 2: 2 cells but the header has 3 columns (no cell for column `digit`)"],
            ),
            (
                "file,digit\na.png,1,2\n",
                &["labels.csv line 2: 3 cells", "past the last column `digit`"],
            ),
            (
                "file,digit\n,1\n",
                &["labels.csv line 2, column `file`: empty file name"],
            ),
            (
                many.as_str(),
                &[
                    "labels.csv line 3, column `tags`",
                    "class `c64` is the 65th of multi-label task `tags`",
                ],
            ),
            (
                "file,,digit\na.png,1,2\n",
                &["labels.csv line 1, column 2: empty column name"],
            ),
            (
                "file,digit,digit\na.png,1,2\n",
                &["labels.csv line 1: columns 2 and 3 are both named `digit`"],
            ),
            ("path,digit\na.png,1\n", &["labels.csv line 1: no `file` column"]),
            (
                "file,split\na.png,train\n",
                &["labels.csv line 1: no task column"],
            ),
            ("file,digit\n", &["labels.csv has a header but no image rows"]),
            (
                "file,digit\na.png,1\n\nnope.png,2\n",
                &["labels.csv line 4, column `file`"],
            ),
            ("", &["labels.csv is empty"]),
            (
                "\n\nfile,file\n",
                &["labels.csv line 3: columns 1 and 2 are both named `file`"],
            ),
            (
                "file,digit,tags\na.png,1,\nb.png,2,\n",
                &["labels.csv line 1, column `tags`: every cell is empty"],
            ),
            (
                "file,digit\na.png,\"1\x01\"\n",
                &["labels.csv line 2, column `digit`", "control character"],
            ),
        ] {
            let dir = folder(&["a.png", "b.png"], text);
            let err = format!("{:#}", read(&dir).unwrap_err());
            for needle in needles {
                assert!(err.contains(needle), "{text:?}: {needle:?} not in {err}");
            }
        }
        let dir = folder(&[], "");
        let err = format!(
            "{:#}",
            from_csv(&dir.path().join("nope.csv"), dir.path()).unwrap_err()
        );
        assert!(
            err.contains("cannot read labels file") && err.contains("nope.csv"),
            "{err}"
        );
    }

    /// Class folders as torchvision's `ImageFolder` reads them: images in
    /// their subfolders count (they were dropped: 3 of 5 imported), hidden
    /// folders are no class (`.git` was one), an empty folder is no class and
    /// a file of another kind is left out, each with a note.
    #[test]
    fn class_folders_are_walked_and_what_is_left_out_is_said() {
        let dir = folder(
            &[
                "cat/1.png",
                "cat/deep/er/2.JPG",
                "cat/.DS_Store",
                "dog/3.webp",
                "dog/readme.txt",
                ".git/objects/4.png",
                "empty/.keep",
            ],
            "",
        );
        let got = from_folders(dir.path()).unwrap();
        assert_eq!(got.tasks[0].class_names, ["cat", "dog"]);
        let listed: Vec<(&str, usize)> = got.images.iter().map(|l| (l.rel.as_str(), l.labels[0])).collect();
        assert_eq!(
            listed,
            [("cat/1.png", 0), ("cat/deep/er/2.JPG", 0), ("dog/3.webp", 1)]
        );
        let notes = got.notes.join("\n");
        assert!(notes.contains("empty holds no images"), "{notes}");
        assert!(
            notes.contains("1 files that are not") && notes.contains("readme.txt"),
            "{notes}"
        );
        assert!(!notes.contains(".git"), "{notes}");
    }
}
