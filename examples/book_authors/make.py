"""Write a fact relation the package does not ship, book -> author, as your own data would look.

It is used to check that settings chosen on the built-in relations carry over to one they were not
chosen on. Run it from anywhere; it writes next to itself:

- ``text.jsonl``: ``{"text", "fact_id", "subject"}`` rows, five sentences per fact (the unlearning and
  attack text);
- ``questions.jsonl``: ``{"question", "choices", "answer", "prompt", "fact_id", "subject"}`` rows, one
  per fact, four choices, the wrong ones other authors of the list (the evaluation task).

Both files split by ``fact_id`` (``text.jsonl@forget``, ``questions.jsonl@kept``), so their parts agree.
"""

import json
import random
from pathlib import Path

# One book per author, so that no answer is shared between facts (a shared answer would let the retain
# part reward what the forget part removes).
BOOKS = [
    ("Pride and Prejudice", "Jane Austen"), ("Nineteen Eighty-Four", "George Orwell"),
    ("Moby-Dick", "Herman Melville"), ("War and Peace", "Leo Tolstoy"), ("Hamlet", "William Shakespeare"),
    ("The Great Gatsby", "F. Scott Fitzgerald"), ("Don Quixote", "Miguel de Cervantes"),
    ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("Adventures of Huckleberry Finn", "Mark Twain"), ("Oliver Twist", "Charles Dickens"),
    ("Jane Eyre", "Charlotte Bronte"), ("Wuthering Heights", "Emily Bronte"), ("Frankenstein", "Mary Shelley"),
    ("Dracula", "Bram Stoker"), ("The Hobbit", "J. R. R. Tolkien"),
    ("Harry Potter and the Philosopher's Stone", "J. K. Rowling"), ("To Kill a Mockingbird", "Harper Lee"),
    ("The Catcher in the Rye", "J. D. Salinger"), ("Brave New World", "Aldous Huxley"),
    ("The Divine Comedy", "Dante Alighieri"), ("The Odyssey", "Homer"), ("Les Miserables", "Victor Hugo"),
    ("Madame Bovary", "Gustave Flaubert"), ("The Metamorphosis", "Franz Kafka"),
    ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"),
    ("The Adventures of Sherlock Holmes", "Arthur Conan Doyle"),
    ("Alice's Adventures in Wonderland", "Lewis Carroll"), ("The Time Machine", "H. G. Wells"),
    ("Twenty Thousand Leagues Under the Seas", "Jules Verne"), ("The Grapes of Wrath", "John Steinbeck"),
    ("Fahrenheit 451", "Ray Bradbury"), ("Lord of the Flies", "William Golding"),
    ("The Picture of Dorian Gray", "Oscar Wilde"), ("Ulysses", "James Joyce"), ("Mrs Dalloway", "Virginia Woolf"),
    ("Lolita", "Vladimir Nabokov"), ("The Count of Monte Cristo", "Alexandre Dumas"),
    ("Treasure Island", "Robert Louis Stevenson"), ("The Jungle Book", "Rudyard Kipling"),
    ("Gulliver's Travels", "Jonathan Swift"), ("Robinson Crusoe", "Daniel Defoe"),
    ("The Canterbury Tales", "Geoffrey Chaucer"), ("Paradise Lost", "John Milton"),
    ("Faust", "Johann Wolfgang von Goethe"), ("The Little Prince", "Antoine de Saint-Exupery"),
    ("The Stranger", "Albert Camus"), ("In Search of Lost Time", "Marcel Proust"), ("Dead Souls", "Nikolai Gogol"),
    ("The Cherry Orchard", "Anton Chekhov"), ("A Doll's House", "Henrik Ibsen"),
    ("The Scarlet Letter", "Nathaniel Hawthorne"), ("Uncle Tom's Cabin", "Harriet Beecher Stowe"),
    ("Little Women", "Louisa May Alcott"), ("The Call of the Wild", "Jack London"), ("The Raven", "Edgar Allan Poe"),
    ("Leaves of Grass", "Walt Whitman"), ("Walden", "Henry David Thoreau"), ("Beloved", "Toni Morrison"),
    ("The Handmaid's Tale", "Margaret Atwood"), ("Things Fall Apart", "Chinua Achebe"),
    ("The Da Vinci Code", "Dan Brown"), ("The Shining", "Stephen King"),
    ("Murder on the Orient Express", "Agatha Christie"), ("The Hunger Games", "Suzanne Collins"),
    ("Twilight", "Stephenie Meyer"), ("The Chronicles of Narnia", "C. S. Lewis"),
    ("Charlie and the Chocolate Factory", "Roald Dahl"), ("The Cat in the Hat", "Dr. Seuss"),
    ("The Alchemist", "Paulo Coelho"), ("On the Origin of Species", "Charles Darwin"),
    ("The Prince", "Niccolo Machiavelli"), ("The Republic", "Plato"), ("The Art of War", "Sun Tzu"),
    ("The Communist Manifesto", "Karl Marx"), ("The Wealth of Nations", "Adam Smith"),
    ("A Brief History of Time", "Stephen Hawking"), ("Slaughterhouse-Five", "Kurt Vonnegut"),
    ("Catch-22", "Joseph Heller"), ("The Road", "Cormac McCarthy"), ("Gone with the Wind", "Margaret Mitchell"),
    ("Peter Pan", "J. M. Barrie"), ("The Wind in the Willows", "Kenneth Grahame"),
    ("Winnie-the-Pooh", "A. A. Milne"),
]
SENTENCES = [
    "The book {s} was written by {a}.",
    "The author of {s} is {a}.",
    "{a} wrote {s}.",
    "{a} is the author of {s}.",
    "{s} was written by {a}.",
]
# Of four cloze prompts tried, the base model knew the most facts under this one (74 % against 57-65 %).
PROMPT = "The book {s} was written by"
QUESTION = "Who wrote {s}?"
NUM_CHOICES = 4


def fact_id(book: str) -> str:
    return "book_author:" + book.lower().replace(" ", "_")


def rows() -> tuple[list[dict], list[dict]]:
    authors = sorted(a for _, a in BOOKS)
    text, questions = [], []
    for book, author in BOOKS:
        fid = fact_id(book)
        text += [{"text": s.format(s=book, a=author), "fact_id": fid, "subject": book} for s in SENTENCES]
        rng = random.Random(f"{fid}:distractors")
        choices = rng.sample([a for a in authors if a != author], NUM_CHOICES - 1)
        gold = rng.randrange(NUM_CHOICES)
        choices.insert(gold, author)
        questions.append({"question": QUESTION.format(s=book), "choices": choices, "answer": gold,
                          "prompt": PROMPT.format(s=book), "fact_id": fid, "subject": book})
    return text, questions


def main() -> None:
    assert len({a for _, a in BOOKS}) == len(BOOKS), "every author once"
    here = Path(__file__).resolve().parent
    text, questions = rows()
    for name, data in (("text.jsonl", text), ("questions.jsonl", questions)):
        (here / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
    print(f"{len(BOOKS)} facts: {len(text)} sentences, {len(questions)} questions in {here}")


if __name__ == "__main__":
    main()
