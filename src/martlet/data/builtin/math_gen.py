"""Deterministic generator of arithmetic word problems with checked answers.

Each generated row looks like::

    {"query": "...", "response": "...step by step...\\nAnswer: 38",
     "answer": "38", "lang": "en", "meta": {"kind": "add", "a": 23, "b": 15}}

* ``response`` is a short worked solution whose last line is exactly
  ``Answer: <answer>`` (English) or ``答案：<answer>`` (Chinese).
* ``answer`` is an integer (``"38"``) or a reduced fraction (``"5/6"``).
* ``meta`` holds the problem kind and the numbers that appear in the question,
  so the answer can be recomputed independently (the unit tests do this).

Every answer is computed once and then verified by a second, independent route
(inverse operation, simulation, substitution back into the equation, ...); a
failed check raises ``AssertionError`` so a bug can never emit a wrong answer.

Only the standard library is used, and all randomness comes from one
``random.Random(seed)`` instance: the same arguments always give the same rows.

Usage::

    from martlet.data.builtin.math_gen import generate
    rows = generate(100, seed=0, lang="mixed")

or from the command line: ``python math_gen.py 10 --seed 1 --lang zh``.
"""

from __future__ import annotations

import math
import random
import zlib
from fractions import Fraction
from typing import Callable

__all__ = ["generate", "KINDS", "EASY_KINDS", "LANGS", "LEVELS"]

LANGS = ("en", "zh", "mixed")

# ----------------------------------------------------------------------------
# vocabulary
# ----------------------------------------------------------------------------

# (name, subject pronoun, object pronoun, possessive)
_EN_PEOPLE = [
    ("Emma", "she", "her", "her"), ("Liam", "he", "him", "his"),
    ("Olivia", "she", "her", "her"), ("Noah", "he", "him", "his"),
    ("Ava", "she", "her", "her"), ("Lucas", "he", "him", "his"),
    ("Mia", "she", "her", "her"), ("Ethan", "he", "him", "his"),
    ("Sophia", "she", "her", "her"), ("Jack", "he", "him", "his"),
    ("Chloe", "she", "her", "her"), ("Ben", "he", "him", "his"),
    ("Grace", "she", "her", "her"), ("Daniel", "he", "him", "his"),
    ("Lily", "she", "her", "her"), ("Sam", "he", "him", "his"),
]
# (name, pronoun)
_ZH_PEOPLE = [
    ("小明", "他"), ("小红", "她"), ("小刚", "他"), ("小丽", "她"),
    ("小华", "他"), ("小芳", "她"), ("李雷", "他"), ("韩梅梅", "她"),
    ("小军", "他"), ("小雪", "她"), ("王阿姨", "她"), ("张叔叔", "他"),
]
# (english plural, chinese noun, chinese measure word)
_ITEMS = [
    ("apples", "苹果", "个"), ("oranges", "橘子", "个"), ("pencils", "铅笔", "支"),
    ("stickers", "贴纸", "张"), ("marbles", "玻璃球", "颗"), ("cookies", "饼干", "块"),
    ("stamps", "邮票", "枚"), ("candies", "糖果", "颗"), ("eggs", "鸡蛋", "个"),
    ("balloons", "气球", "个"), ("cards", "卡片", "张"), ("books", "书", "本"),
]
# things you can buy: (english with article-free noun, chinese measure, chinese noun)
_GOODS = [
    ("jacket", "件", "外套"), ("pair of headphones", "副", "耳机"),
    ("desk lamp", "盏", "台灯"), ("backpack", "个", "书包"),
    ("bicycle helmet", "顶", "自行车头盔"), ("watch", "块", "手表"),
    ("pair of shoes", "双", "鞋"),
]
# things bought by the piece: (english plural, chinese noun, chinese measure)
_UNIT_GOODS = [
    ("pens", "笔", "支"), ("notebooks", "笔记本", "本"), ("bottles of juice", "果汁", "瓶"),
    ("sandwiches", "三明治", "个"), ("roses", "玫瑰花", "枝"), ("tennis balls", "网球", "个"),
]


def _fmt(x) -> str:
    """Format an int or Fraction as ``"12"`` or ``"5/6"`` (always reduced)."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    return f"{x.numerator}/{x.denominator}"


def _check(cond: bool, what: str) -> None:
    # explicit raise instead of `assert` so the checks survive `python -O`
    if not cond:
        raise AssertionError(f"math_gen self-check failed: {what}")


def _en_person(rng: random.Random):
    return rng.choice(_EN_PEOPLE)


def _zh_person(rng: random.Random):
    return rng.choice(_ZH_PEOPLE)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _en_list(values) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:-1]) + " and " + values[-1]


# A builder returns (query, steps, answer, meta).
Built = tuple  # (str, list[str], Fraction | int, dict)

# ----------------------------------------------------------------------------
# problem kinds
# ----------------------------------------------------------------------------


def _add(rng: random.Random, lang: str, small: bool = False) -> Built:
    a, b = (rng.randint(1, 9), rng.randint(1, 9)) if small else (rng.randint(12, 95), rng.randint(5, 60))
    ans = a + b
    _check(ans - b == a and ans - a == b and ans > max(a, b), "add inverse")
    variant = rng.randrange(3)
    if lang == "en":
        name, subj, obj, poss = _en_person(rng)
        if variant == 0:
            pl, _, _ = rng.choice(_ITEMS)
            q = (f"{name} has {a} {pl}. A friend gives {obj} {b} more {pl}. "
                 f"How many {pl} does {name} have now?")
            steps = [f"{name} starts with {a} {pl} and gets {b} more, so we add:",
                     f"{a} + {b} = {ans}"]
        elif variant == 1:
            q = (f"{name} read {a} pages of a book on Saturday and {b} pages on Sunday. "
                 f"How many pages did {name} read over the weekend?")
            steps = [f"Add the pages read on both days: {a} + {b} = {ans}"]
        else:
            q = (f"{name} saved ${a} in March and ${b} in April. "
                 f"How much money did {subj} save in these two months, in dollars?")
            steps = [f"Add the savings of both months: ${a} + ${b} = ${ans}"]
    else:
        name, pron = _zh_person(rng)
        if variant == 0:
            _, it, m = rng.choice(_ITEMS)
            q = f"{name}有{a}{m}{it}，朋友又送给{pron}{b}{m}。{name}现在一共有多少{m}{it}？"
            steps = [f"原有{a}{m}，又得到{b}{m}，合起来用加法：", f"{a} + {b} = {ans}（{m}）"]
        elif variant == 1:
            q = f"{name}星期六读了{a}页书，星期日读了{b}页。{pron}这个周末一共读了多少页？"
            steps = [f"把两天读的页数相加：{a} + {b} = {ans}（页）"]
        else:
            q = f"{name}三月存了{a}元，四月存了{b}元。这两个月{pron}一共存了多少元？"
            steps = [f"把两个月的存款相加：{a} + {b} = {ans}（元）"]
    return q, steps, ans, {"kind": "add", "a": a, "b": b}


def _sub(rng: random.Random, lang: str, small: bool = False) -> Built:
    if small:  # a one-digit number taken from at most 18, leaving a one-digit number
        b = rng.randint(1, 9)
        a = b + rng.randint(1, 9)
    else:
        a = rng.randint(30, 200)
        b = rng.randint(5, a - 5)
    ans = a - b
    _check(ans + b == a and 0 < ans < a, "sub inverse")
    variant = rng.randrange(3)
    if lang == "en":
        name, subj, obj, poss = _en_person(rng)
        if variant == 0:
            good, _, _ = rng.choice(_GOODS)
            q = (f"{name} had ${a}. {_cap(subj)} spent ${b} on a {good}. "
                 f"How many dollars does {name} have left?")
            steps = [f"Subtract the amount spent from the amount {name} had:",
                     f"${a} - ${b} = ${ans}"]
        elif variant == 1:
            q = (f"A book has {a} pages. {name} has already read {b} pages. "
                 f"How many pages are left to read?")
            steps = [f"Pages left = total pages - pages read = {a} - {b} = {ans}"]
        else:
            pl, _, _ = rng.choice(_ITEMS)
            q = (f"A shop had {a} {pl} in the morning and sold {b} of them during the day. "
                 f"How many {pl} are left?")
            steps = [f"Subtract the number sold from the starting number: {a} - {b} = {ans}"]
    else:
        name, pron = _zh_person(rng)
        if variant == 0:
            _, m, good = rng.choice(_GOODS)
            q = f"{name}有{a}元，买一{m}{good}花了{b}元。{pron}还剩多少元？"
            steps = ["用原有的钱减去花掉的钱：", f"{a} - {b} = {ans}（元）"]
        elif variant == 1:
            q = f"一本书共有{a}页，{name}已经读了{b}页。还剩多少页没有读？"
            steps = [f"剩下的页数 = 总页数 - 已读页数 = {a} - {b} = {ans}（页）"]
        else:
            _, it, m = rng.choice(_ITEMS)
            q = f"商店早上有{a}{m}{it}，白天卖出了{b}{m}。还剩多少{m}{it}？"
            steps = [f"用原有的数量减去卖出的数量：{a} - {b} = {ans}（{m}）"]
    return q, steps, ans, {"kind": "sub", "a": a, "b": b}


def _mul(rng: random.Random, lang: str, small: bool = False) -> Built:
    a, b = (rng.randint(2, 9), rng.randint(2, 9)) if small else (rng.randint(3, 12), rng.randint(4, 25))
    ans = a * b
    total = 0
    for _ in range(a):  # repeated addition as the independent route
        total += b
    _check(total == ans, "mul repeated addition")
    variant = rng.randrange(3)
    if lang == "en":
        name, subj, obj, poss = _en_person(rng)
        if variant == 0:
            pl, _, _ = rng.choice(_ITEMS)
            q = f"There are {a} boxes, and each box holds {b} {pl}. How many {pl} are there in total?"
            steps = [f"Each of the {a} boxes holds {b} {pl}, so multiply:", f"{a} × {b} = {ans}"]
        elif variant == 1:
            q = (f"A hall has {a} rows of seats with {b} seats in each row. "
                 f"How many seats are there in the hall?")
            steps = [f"Number of seats = rows × seats per row = {a} × {b} = {ans}"]
        else:
            q = (f"{name} buys {a} concert tickets that cost ${b} each. "
                 f"How many dollars does {subj} pay in total?")
            steps = [f"Total cost = number of tickets × price = {a} × ${b} = ${ans}"]
    else:
        name, pron = _zh_person(rng)
        if variant == 0:
            _, it, m = rng.choice(_ITEMS)
            q = f"有{a}个盒子，每个盒子里装{b}{m}{it}。一共有多少{m}{it}？"
            steps = [f"每个盒子装{b}{m}，有{a}个盒子，用乘法：", f"{a} × {b} = {ans}（{m}）"]
        elif variant == 1:
            q = f"礼堂里有{a}排座位，每排有{b}个座位。礼堂一共有多少个座位？"
            steps = [f"座位总数 = 排数 × 每排座位数 = {a} × {b} = {ans}（个）"]
        else:
            q = f"{name}买了{a}张音乐会门票，每张{b}元。{pron}一共要付多少元？"
            steps = [f"总价 = 张数 × 单价 = {a} × {b} = {ans}（元）"]
    return q, steps, ans, {"kind": "mul", "a": a, "b": b}


def _divrem(rng: random.Random, lang: str) -> Built:
    ask = rng.choice(["quotient", "remainder", "ceil"])
    k = rng.randint(3, 9)
    q_ = rng.randint(3, 15)
    r_ = rng.randint(0, k - 1) if ask == "quotient" else rng.randint(1, k - 1)
    n = q_ * k + r_
    q, r = divmod(n, k)
    _check(q == q_ and r == r_ and q * k + r == n and 0 <= r < k, "divmod")
    if ask == "quotient":
        ans = q
    elif ask == "remainder":
        ans = r
    else:
        ans = -(-n // k)  # ceiling division
        _check((ans - 1) * k < n <= ans * k and ans == q + 1, "ceil division")
    div_line = f"{n} ÷ {k} = {q}" + (f" remainder {r}" if r else "")
    if lang == "en":
        name, subj, obj, poss = _en_person(rng)
        pl, _, _ = rng.choice(_ITEMS)
        if ask == "quotient":
            q_text = (f"{n} {pl} are shared equally among {k} children, and each child gets as many "
                      f"as possible. How many {pl} does each child get?")
            tail = f"Each child gets {q} {pl}" + (f", and {r} are left over." if r else ".")
            steps = [div_line, tail]
        elif ask == "remainder":
            q_text = (f"{name} packs {n} {pl} into bags of {k}. After filling as many full bags "
                      f"as possible, how many {pl} are left over?")
            steps = [div_line,
                     f"{q} full bags use {q} × {k} = {q * k} {pl}, so {n} - {q * k} = {r} are left over."]
        else:
            q_text = (f"{n} students are going on a field trip. Each van can carry {k} students. "
                      f"How many vans are needed?")
            steps = [div_line,
                     f"{q} vans carry {q * k} students; the other {r} students need one more van, "
                     f"so {q} + 1 = {ans} vans."]
    else:
        name, pron = _zh_person(rng)
        _, it, m = rng.choice(_ITEMS)
        div_line = f"{n} ÷ {k} = {q}" + (f"……{r}" if r else "")
        if ask == "quotient":
            q_text = f"把{n}{m}{it}平均分给{k}个小朋友，每人尽量分得一样多。每个小朋友能分到多少{m}？"
            tail = f"每个小朋友分到{q}{m}" + (f"，还剩{r}{m}。" if r else "。")
            steps = [div_line, tail]
        elif ask == "remainder":
            q_text = f"{name}把{n}{m}{it}装进袋子，每袋装{k}{m}。装满尽可能多的袋子后，还剩多少{m}？"
            steps = [div_line, f"装满{q}袋用去{q} × {k} = {q * k}{m}，还剩{n} - {q * k} = {r}（{m}）。"]
        else:
            q_text = f"{n}名学生去春游，每辆面包车最多坐{k}人。至少需要多少辆面包车？"
            steps = [div_line,
                     f"{q}辆车能坐{q * k}人，剩下的{r}人还需要1辆车，所以需要{q} + 1 = {ans}（辆）。"]
    return q_text, steps, ans, {"kind": "divrem", "n": n, "k": k, "ask": ask}


def _percent(rng: random.Random, lang: str) -> Built:
    mode = rng.choice(["discount", "percent_of"])
    if mode == "discount":
        pct = rng.choice([10, 15, 20, 25, 30, 40, 50])
        price = 20 * rng.randint(2, 15)
        disc = Fraction(price * pct, 100)
        ans = Fraction(price * (100 - pct), 100)  # pay (100 - pct)% of the price
        _check(ans + disc == price and ans.denominator == 1 and disc.denominator == 1, "discount")
        meta = {"kind": "percent", "mode": mode, "price": price, "pct": pct}
        if lang == "en":
            good, _, _ = rng.choice(_GOODS)
            q = (f"A {good} costs ${price}. It is on sale for {pct}% off. "
                 f"What is the sale price in dollars?")
            steps = [f"Discount: {pct}% of ${price} = {price} × {pct}/100 = ${_fmt(disc)}",
                     f"Sale price: ${price} - ${_fmt(disc)} = ${_fmt(ans)}"]
        else:
            _, m, good = rng.choice(_GOODS)
            if pct % 10 == 0:
                zhe = (100 - pct) // 10
                q = f"一{m}{good}原价{price}元，现在打{zhe}折出售。现价是多少元？"
                steps = [f"打{zhe}折表示按原价的{100 - pct}%出售：",
                         f"{price} × {100 - pct}% = {_fmt(ans)}（元）"]
            else:
                q = f"一{m}{good}原价{price}元，现在降价{pct}%。现价是多少元？"
                steps = [f"降价金额：{price} × {pct}% = {_fmt(disc)}（元）",
                         f"现价：{price} - {_fmt(disc)} = {_fmt(ans)}（元）"]
    else:
        pct = rng.choice([10, 20, 25, 30, 40, 50, 60, 75, 80])
        unit = 100 // math.gcd(pct, 100)
        total = unit * rng.randint(max(1, 20 // unit), 200 // unit)
        ans = Fraction(total * pct, 100)
        rest = Fraction(total * (100 - pct), 100)
        _check(ans.denominator == 1 and ans + rest == total, "percent of")
        meta = {"kind": "percent", "mode": mode, "total": total, "pct": pct}
        variant = rng.randrange(2)
        if lang == "en":
            if variant == 0:
                q = (f"There are {total} students in a school club, and {pct}% of them are girls. "
                     f"How many girls are in the club?")
            else:
                q = (f"An orchard has {total} trees, and {pct}% of them are apple trees. "
                     f"How many apple trees are there?")
            steps = [f"{pct}% of {total} = {total} × {pct}/100 = {_fmt(ans)}"]
        else:
            if variant == 0:
                q = f"学校某社团有{total}名学生，其中{pct}%是女生。女生有多少名？"
                unit_zh = "名"
            else:
                q = f"一个果园有{total}棵树，其中{pct}%是苹果树。苹果树有多少棵？"
                unit_zh = "棵"
            steps = [f"{total} × {pct}% = {total} × {pct}/100 = {_fmt(ans)}（{unit_zh}）"]
    return q, steps, ans, meta


def _fraction_add(rng: random.Random, lang: str) -> Built:
    mode = rng.choice(["together", "left"])
    dens = [2, 3, 4, 5, 6, 8, 10, 12]
    while True:
        b, d = rng.choice(dens), rng.choice(dens)
        # numerators coprime to their denominators, so the given fractions are in lowest terms
        a = rng.choice([x for x in range(1, b) if math.gcd(x, b) == 1])
        c = rng.choice([x for x in range(1, d) if math.gcd(x, d) == 1])
        total = Fraction(a, b) + Fraction(c, d)
        if total < 1 or (mode == "together" and total == 1):
            break
    lcd = b * d // math.gcd(b, d)
    big_a, big_c = a * (lcd // b), c * (lcd // d)
    # independent route: integer arithmetic over the common denominator
    _check(Fraction(big_a + big_c, lcd) == total, "fraction common denominator")
    ans = total if mode == "together" else 1 - total
    if mode == "left":
        _check(Fraction(lcd - big_a - big_c, lcd) == ans and ans > 0, "fraction remainder")
    common = (lcd == b == d)
    if lang == "en":
        (n1, *_), (n2, *_) = rng.sample(_EN_PEOPLE, 2)
        if mode == "together":
            q = (f"{n1} ate {a}/{b} of a pizza and {n2} ate {c}/{d} of the same pizza. "
                 f"What fraction of the pizza did they eat altogether?")
        else:
            q = (f"A cake is cut into equal pieces. {n1} eats {a}/{b} of the cake and {n2} eats "
                 f"{c}/{d} of it. What fraction of the cake is left?")
        steps = []
        if not common:
            steps.append(f"Use the common denominator {lcd}: {a}/{b} = {big_a}/{lcd} and "
                         f"{c}/{d} = {big_c}/{lcd}.")
        eaten = f"{big_a}/{lcd} + {big_c}/{lcd} = {big_a + big_c}/{lcd}"
        if _fmt(total) != f"{big_a + big_c}/{lcd}":
            eaten += f" = {_fmt(total)}"
        steps.append(f"Eaten together: {eaten}")
        if mode == "left":
            left = f"1 - {_fmt(total)} = {lcd - big_a - big_c}/{lcd}"
            if _fmt(ans) != f"{lcd - big_a - big_c}/{lcd}":
                left += f" = {_fmt(ans)}"
            steps.append(f"Left over: {left}")
    else:
        (n1, _), (n2, _) = rng.sample(_ZH_PEOPLE, 2)
        if mode == "together":
            q = f"{n1}吃了一个披萨的{a}/{b}，{n2}吃了同一个披萨的{c}/{d}。他们一共吃了这个披萨的几分之几？"
        else:
            q = f"一块蛋糕，{n1}吃了它的{a}/{b}，{n2}吃了它的{c}/{d}。还剩这块蛋糕的几分之几？"
        steps = []
        if not common:
            steps.append(f"先通分，公分母是{lcd}：{a}/{b} = {big_a}/{lcd}，{c}/{d} = {big_c}/{lcd}。")
        eaten = f"{big_a}/{lcd} + {big_c}/{lcd} = {big_a + big_c}/{lcd}"
        if _fmt(total) != f"{big_a + big_c}/{lcd}":
            eaten += f" = {_fmt(total)}"
        steps.append(f"两人一共吃了：{eaten}")
        if mode == "left":
            left = f"1 - {_fmt(total)} = {lcd - big_a - big_c}/{lcd}"
            if _fmt(ans) != f"{lcd - big_a - big_c}/{lcd}":
                left += f" = {_fmt(ans)}"
            steps.append(f"还剩：{left}")
    meta = {"kind": "fraction_add", "mode": mode, "a": a, "b": b, "c": c, "d": d}
    return q, steps, ans, meta


def _fraction_of(rng: random.Random, lang: str) -> Built:
    q_ = rng.choice([2, 3, 4, 5, 6, 8, 10])
    p = rng.choice([x for x in range(1, q_) if math.gcd(x, q_) == 1])
    total = q_ * rng.randint(2, 12)
    part = total // q_
    ans = part * p
    _check(Fraction(total) * Fraction(p, q_) == ans and total % q_ == 0, "fraction of")
    variant = rng.randrange(2)
    if lang == "en":
        name, subj, obj, poss = _en_person(rng)
        if variant == 0:
            q = (f"A class has {total} students, and {p}/{q_} of them take the bus to school. "
                 f"How many students take the bus?")
            unit = "students"
        else:
            q = (f"{name} has a ribbon {total} cm long and uses {p}/{q_} of it to wrap a gift. "
                 f"How many centimeters of ribbon does {subj} use?")
            unit = "cm"
        if p == 1:
            steps = [f"1/{q_} of {total} = {total} ÷ {q_} = {ans} {unit}"]
        else:
            steps = [f"First find 1/{q_} of {total}: {total} ÷ {q_} = {part}",
                     f"Then take {p} of those parts: {part} × {p} = {ans} {unit}"]
    else:
        name, pron = _zh_person(rng)
        if variant == 0:
            q = f"一个班有{total}名学生，其中{p}/{q_}的学生坐公交车上学。坐公交车上学的学生有多少名？"
            unit = "名"
        else:
            q = f"{name}有一根长{total}厘米的丝带，用去了它的{p}/{q_}来包礼物。用去了多少厘米？"
            unit = "厘米"
        if p == 1:
            steps = [f"{total}的1/{q_}：{total} ÷ {q_} = {ans}（{unit}）"]
        else:
            steps = [f"先求{total}的1/{q_}：{total} ÷ {q_} = {part}",
                     f"再乘{p}：{part} × {p} = {ans}（{unit}）"]
    return q, steps, ans, {"kind": "fraction_of", "total": total, "p": p, "q": q_}


def _rate(rng: random.Random, lang: str) -> Built:
    mode = rng.choice(["speed", "time", "distance", "price"])
    if mode == "price":
        u = rng.randint(2, 12)
        n1 = rng.randint(3, 8)
        n2 = rng.choice([x for x in range(2, 16) if x != n1])
        cost1 = u * n1
        ans = u * n2
        _check(Fraction(cost1, n1) * n2 == ans and ans * n1 == cost1 * n2, "unit price")
        meta = {"kind": "rate", "mode": mode, "count1": n1, "cost1": cost1, "count2": n2}
        if lang == "en":
            pl, _, _ = rng.choice(_UNIT_GOODS)
            q = f"{n1} {pl} cost ${cost1}. At the same price, how many dollars do {n2} {pl} cost?"
            steps = [f"Price of one: ${cost1} ÷ {n1} = ${u}",
                     f"Cost of {n2}: {n2} × ${u} = ${ans}"]
        else:
            _, it, m = rng.choice(_UNIT_GOODS)
            q = f"{n1}{m}{it}一共{cost1}元。照这样计算，买{n2}{m}{it}需要多少元？"
            steps = [f"每{m}的价格：{cost1} ÷ {n1} = {u}（元）",
                     f"{n2}{m}的价格：{n2} × {u} = {ans}（元）"]
        return q, steps, ans, meta

    cycling = mode == "distance"
    s = rng.randint(10, 20) if cycling else 5 * rng.randint(8, 24)
    t = rng.randint(2, 6)
    d = s * t
    _check(Fraction(d, t) == s and Fraction(d, s) == t, "speed-distance-time")
    if mode == "speed":
        ans = s
        meta = {"kind": "rate", "mode": mode, "distance": d, "time": t}
        if lang == "en":
            q = f"A car travels {d} km in {t} hours at a steady speed. What is its speed in km/h?"
            steps = [f"Speed = distance ÷ time = {d} ÷ {t} = {s} km/h"]
        else:
            q = f"一辆汽车{t}小时匀速行驶了{d}千米。它的速度是每小时多少千米？"
            steps = [f"速度 = 路程 ÷ 时间 = {d} ÷ {t} = {s}（千米/时）"]
    elif mode == "time":
        ans = t
        meta = {"kind": "rate", "mode": mode, "distance": d, "speed": s}
        if lang == "en":
            q = f"A train travels at {s} km/h. How many hours does it take to travel {d} km?"
            steps = [f"Time = distance ÷ speed = {d} ÷ {s} = {t} hours"]
        else:
            q = f"一列火车每小时行驶{s}千米。行驶{d}千米需要多少小时？"
            steps = [f"时间 = 路程 ÷ 速度 = {d} ÷ {s} = {t}（小时）"]
    else:
        ans = d
        meta = {"kind": "rate", "mode": mode, "speed": s, "time": t}
        if lang == "en":
            name, subj, obj, poss = _en_person(rng)
            q = f"{name} cycles at {s} km/h for {t} hours. How many kilometers does {subj} ride?"
            steps = [f"Distance = speed × time = {s} × {t} = {d} km"]
        else:
            name, pron = _zh_person(rng)
            q = f"{name}骑自行车，每小时骑{s}千米，一共骑了{t}小时。{pron}一共骑了多少千米？"
            steps = [f"路程 = 速度 × 时间 = {s} × {t} = {d}（千米）"]
    return q, steps, ans, meta


def _average(rng: random.Random, lang: str) -> Built:
    count = rng.randint(3, 6)
    variant = rng.randrange(2)
    lo, hi = (66, 100) if variant == 0 else (20, 60)
    values = [rng.randint(lo, hi) for _ in range(count)]
    values[-1] -= sum(values) % count  # make the mean a whole number
    total = sum(values)
    ans = Fraction(total, count)
    # independent route: deviations from the mean cancel out
    running = 0
    for v in values:
        running += v
    _check(running == total and ans.denominator == 1
           and sum(Fraction(v) - ans for v in values) == 0, "average")
    if lang == "en":
        name, subj, obj, poss = _en_person(rng)
        if variant == 0:
            q = (f"{name}'s scores on {count} tests were {_en_list(values)}. "
                 f"What is {poss} average score?")
        else:
            q = (f"{name} read for {_en_list(values)} minutes on {count} days in a row. "
                 f"On average, how many minutes did {subj} read per day?")
        steps = [f"Sum: {' + '.join(map(str, values))} = {total}",
                 f"Average: {total} ÷ {count} = {_fmt(ans)}"]
    else:
        name, pron = _zh_person(rng)
        vs = "、".join(map(str, values))
        if variant == 0:
            q = f"{name}最近{count}次考试的成绩分别是{vs}分。{pron}的平均成绩是多少分？"
            unit = "分"
        else:
            q = f"{name}连续{count}天每天阅读的时间分别是{vs}分钟。{pron}平均每天阅读多少分钟？"
            unit = "分钟"
        steps = [f"总数：{' + '.join(map(str, values))} = {total}（{unit}）",
                 f"平均数：{total} ÷ {count} = {_fmt(ans)}（{unit}）"]
    return q, steps, ans, {"kind": "average", "values": values}


def _change(rng: random.Random, lang: str) -> Built:
    """Buy k items at p each, pay with one bill: the change."""
    k = rng.randint(2, 6)
    p = rng.randint(2, 15)
    cost = k * p
    paid = rng.choice([b for b in (20, 50, 100) if b > cost])
    ans = paid - cost
    sim = paid
    for _ in range(k):
        sim -= p
    _check(sim == ans and ans > 0, "change simulation")
    meta = {"kind": "two_step", "mode": "change", "count": k, "price": p, "paid": paid}
    if lang == "en":
        name, subj, obj, poss = _en_person(rng)
        pl, _, _ = rng.choice(_UNIT_GOODS)
        q = (f"{name} buys {k} {pl} that cost ${p} each and pays with a ${paid} bill. "
             f"How many dollars of change should {subj} get?")
        steps = [f"Cost: {k} × ${p} = ${cost}", f"Change: ${paid} - ${cost} = ${ans}"]
    else:
        name, pron = _zh_person(rng)
        _, it, m = rng.choice(_UNIT_GOODS)
        q = f"{name}买了{k}{m}{it}，每{m}{p}元，付了{paid}元。应该找回多少元？"
        steps = [f"一共花费：{k} × {p} = {cost}（元）", f"找回：{paid} - {cost} = {ans}（元）"]
    return q, steps, ans, meta


def _stock(rng: random.Random, lang: str) -> Built:
    """A store sells the same number of bottles each day, then gets a delivery: what is left."""
    days = rng.randint(2, 7)
    per_day = rng.randint(5, 20)
    start = rng.randint(per_day * days + 10, 300)
    delivery = rng.randint(20, 100)
    ans = start - per_day * days + delivery
    sim = start
    for _ in range(days):
        sim -= per_day
        _check(sim >= 0, "stock never negative")
    sim += delivery
    _check(sim == ans, "stock simulation")
    sold = per_day * days
    meta = {"kind": "two_step", "mode": "stock", "start": start, "per_day": per_day,
            "days": days, "delivery": delivery}
    if lang == "en":
        q = (f"A store has {start} bottles of water. It sells {per_day} bottles every day for "
             f"{days} days and then receives a delivery of {delivery} bottles. "
             f"How many bottles does the store have now?")
        steps = [f"Sold in {days} days: {per_day} × {days} = {sold}",
                 f"After selling: {start} - {sold} = {start - sold}",
                 f"After the delivery: {start - sold} + {delivery} = {ans}"]
    else:
        q = (f"一家商店有{start}瓶矿泉水，每天卖出{per_day}瓶，连续卖了{days}天，"
             f"然后又进货{delivery}瓶。现在商店有多少瓶矿泉水？")
        steps = [f"{days}天卖出：{per_day} × {days} = {sold}（瓶）",
                 f"卖出后还剩：{start} - {sold} = {start - sold}（瓶）",
                 f"进货后：{start - sold} + {delivery} = {ans}（瓶）"]
    return q, steps, ans, meta


def _savings(rng: random.Random, lang: str) -> Built:
    """A start sum plus the same saving every week: the total."""
    start = rng.randint(10, 100)
    weekly = rng.randint(5, 30)
    weeks = rng.randint(3, 12)
    ans = start + weekly * weeks
    sim = start
    for _ in range(weeks):
        sim += weekly
    _check(sim == ans, "savings simulation")
    meta = {"kind": "two_step", "mode": "savings", "start": start, "weekly": weekly, "weeks": weeks}
    if lang == "en":
        name, subj, obj, poss = _en_person(rng)
        q = (f"{name} has ${start} and saves ${weekly} every week. "
             f"How many dollars will {subj} have after {weeks} weeks?")
        steps = [f"Saved in {weeks} weeks: {weeks} × ${weekly} = ${weekly * weeks}",
                 f"Total: ${start} + ${weekly * weeks} = ${ans}"]
    else:
        name, pron = _zh_person(rng)
        q = f"{name}现在有{start}元，每周再存{weekly}元。{weeks}周后{pron}一共有多少元？"
        steps = [f"{weeks}周存入：{weeks} × {weekly} = {weekly * weeks}（元）",
                 f"一共：{start} + {weekly * weeks} = {ans}（元）"]
    return q, steps, ans, meta


_TWO_STEP_MODES: dict[str, Callable[[random.Random, str], Built]] = {
    "change": _change, "stock": _stock, "savings": _savings}


def _two_step(rng: random.Random, lang: str) -> Built:
    mode = rng.choice(["change", "stock", "savings"])
    return _TWO_STEP_MODES[mode](rng, lang)


def _linear(rng: random.Random, lang: str) -> Built:
    a = rng.randint(2, 9)
    x = rng.randint(1, 20)
    op = rng.choice("+-")
    if op == "+":
        b = rng.randint(1, 30)
        c = a * x + b
        rhs = c - b
    else:
        b = rng.randint(1, min(30, a * x - 1))
        c = a * x - b
        rhs = c + b
    ans = Fraction(rhs, a)
    # substitute the solution back into the original equation
    _check(ans == x and (a * ans + b if op == "+" else a * ans - b) == c, "linear substitution")
    eq = f"{a}x {op} {b} = {c}"
    word = rng.randrange(2) == 1
    if lang == "en":
        if word:
            verb = "add" if op == "+" else "subtract"
            q = (f"I am thinking of a number. If I multiply it by {a} and then {verb} {b}, "
                 f"I get {c}. What is the number?")
            steps = [f"Let the number be x. Then {eq}."]
        else:
            q = f"Solve for x: {eq}"
            steps = []
        if op == "+":
            steps.append(f"Subtract {b} from both sides: {a}x = {c} - {b} = {rhs}")
        else:
            steps.append(f"Add {b} to both sides: {a}x = {c} + {b} = {rhs}")
        steps.append(f"Divide both sides by {a}: x = {rhs} ÷ {a} = {_fmt(ans)}")
        steps.append(f"Check: {a} × {_fmt(ans)} {op} {b} = {c}")
    else:
        if word:
            verb = "加上" if op == "+" else "减去"
            q = f"一个数乘以{a}，再{verb}{b}，结果是{c}。这个数是多少？"
            steps = [f"设这个数为x，则 {eq}。"]
        else:
            q = f"解方程：{eq}"
            steps = []
        if op == "+":
            steps.append(f"两边同时减去{b}：{a}x = {c} - {b} = {rhs}")
        else:
            steps.append(f"两边同时加上{b}：{a}x = {c} + {b} = {rhs}")
        steps.append(f"两边同时除以{a}：x = {rhs} ÷ {a} = {_fmt(ans)}")
        steps.append(f"检验：{a} × {_fmt(ans)} {op} {b} = {c}，正确。")
    return q, steps, ans, {"kind": "linear", "a": a, "b": b, "c": c, "op": op}


KINDS: dict[str, Callable[[random.Random, str], Built]] = {
    "add": _add,
    "sub": _sub,
    "mul": _mul,
    "divrem": _divrem,
    "percent": _percent,
    "fraction_add": _fraction_add,
    "fraction_of": _fraction_of,
    "rate": _rate,
    "average": _average,
    "two_step": _two_step,
    "linear": _linear,
}
EASY_KINDS = ("add", "sub", "mul")  # two-number arithmetic, the kinds that take `small`
# level -> None (every kind) or whether the easy kinds draw one-digit numbers
LEVELS: dict[str, bool | None] = {"all": None, "easy": False, "small": True}
HELD_OUT_EVERY = 8


def _make_row(kind: str, rng: random.Random, lang: str, small: bool = False) -> dict:
    query, steps, ans, meta = KINDS[kind](rng, lang, small=True) if small else KINDS[kind](rng, lang)
    answer = _fmt(ans)
    _check(Fraction(answer) == Fraction(ans), "answer formatting round-trip")
    final = f"Answer: {answer}" if lang == "en" else f"答案：{answer}"
    return {
        "query": query,
        "response": "\n".join(list(steps) + [final]),
        "answer": answer,
        "lang": lang,
        "meta": meta,
    }


def held_out(query: str) -> bool:
    """Whether an easy- or small-level question belongs to the evaluation share: one in HELD_OUT_EVERY, by a hash
    of its text. These levels have few distinct questions (the small one 9 x 9 number pairs), so training rows of
    some thousands would hold most of them; their training rows never hold a question of this share, their
    evaluation rows only those."""
    return zlib.crc32(query.encode("utf-8")) % HELD_OUT_EVERY == 0


def generate(n: int, seed: int = 42, lang: str = "mixed", level: str = "all", heldout: bool = False) -> list[dict]:
    """Generate ``n`` checked arithmetic word problems.

    Args:
        n: number of rows.
        seed: seed of the private ``random.Random``; same seed -> identical rows.
        lang: ``"en"``, ``"zh"`` or ``"mixed"`` (alternating English / Chinese,
            so exactly half of each, English first).
        level: ``"all"`` (every kind, each once per ``len(KINDS)`` rows in random
            order), ``"easy"`` (two-number arithmetic: add, sub and mul in turn) or
            ``"small"`` (the easy kinds with one-digit numbers), see :data:`LEVELS`.
        heldout: easy and small levels: draw the evaluation share of the questions
            (:func:`held_out`) instead of the training share.

    Returns:
        A list of dicts with keys ``query``, ``response``, ``answer``, ``lang``
        and ``meta`` (``meta["kind"]`` is one of :data:`KINDS`).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {tuple(LEVELS)}, got {level!r}")
    if heldout and LEVELS[level] is None:
        raise ValueError("heldout applies to the easy and small levels only")
    rng = random.Random(seed)
    kinds = list(KINDS)
    easy = LEVELS[level]
    deck: list[str] = []
    seen: set[str] = set()
    rows: list[dict] = []
    for i in range(n):
        row_lang = lang if lang != "mixed" else ("en" if i % 2 == 0 else "zh")
        if easy is not None:
            kind = EASY_KINDS[i % len(EASY_KINDS)]
        else:
            if not deck:  # every kind appears once per len(KINDS) rows, in random order
                deck = kinds[:]
                rng.shuffle(deck)
            kind = deck.pop()
        for attempt in range(1, 100_000):  # avoid duplicate questions (and, easy and small, the other share)
            row = _make_row(kind, rng, row_lang, small=bool(easy))
            if easy is not None and held_out(row["query"]) != heldout:
                continue
            if row["query"] not in seen or attempt >= 50:
                break
        seen.add(row["query"])
        rows.append(row)
    return rows


def _main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Print generated math word problems as JSON lines.")
    parser.add_argument("n", type=int, nargs="?", default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lang", choices=LANGS, default="mixed")
    args = parser.parse_args(argv)
    for row in generate(args.n, seed=args.seed, lang=args.lang):
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    _main()
