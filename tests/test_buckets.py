"""Aspect-ratio buckets: every size is in pixels and every pair is (height, width)."""

import math
import random

import pytest
from PIL import Image

from zimage_utils.buckets import assign_bucket, make_buckets, plan_crop, resize_and_crop, upscale_factor


@pytest.mark.parametrize("resolution", [64, 128, 512, 1024])
def test_buckets_are_multiples_of_16_and_fill_the_pixel_budget(resolution):
    buckets = make_buckets(resolution)
    assert buckets == sorted(set(buckets))
    assert (resolution, resolution) in buckets
    for h, w in buckets:
        assert h % 16 == 0 and w % 16 == 0
        assert 0.8 * resolution**2 <= h * w <= resolution**2
        assert max(h / w, w / h) <= 4.0
    # Every wide bucket has a tall twin.
    assert {(w, h) for h, w in buckets} == set(buckets)


def test_1024_buckets_reach_4_to_1_both_ways():
    buckets = make_buckets(1024)
    assert (960, 1088) in buckets
    assert (512, 2048) in buckets and (2048, 512) in buckets


def test_max_aspect_limits_the_extremes():
    buckets = make_buckets(1024, max_aspect=2.0)
    assert max(max(h / w, w / h) for h, w in buckets) <= 2.0
    assert (512, 2048) not in buckets


def test_resolution_that_is_not_a_multiple_of_16_is_refused_with_neighbours():
    with pytest.raises(ValueError, match="use 992 or 1008"):
        make_buckets(1000)


def test_square_image_goes_to_the_square_bucket():
    assert assign_bucket(3000, 3000, make_buckets(1024)) == (1024, 1024)


def test_wide_and_tall_images_go_to_wide_and_tall_buckets():
    buckets = make_buckets(1024)
    h, w = assign_bucket(1000, 2000, buckets)  # 2:1 landscape
    assert w > h and w / h == pytest.approx(2.0, rel=0.03)
    h, w = assign_bucket(2000, 1000, buckets)  # 1:2 portrait
    assert h > w and h / w == pytest.approx(2.0, rel=0.03)


def test_aspect_beyond_the_last_bucket_uses_the_most_extreme_one():
    assert assign_bucket(100, 1000, make_buckets(1024)) == (512, 2048)


def test_tie_in_aspect_goes_to_the_larger_bucket():
    assert assign_bucket(100, 100, [(32, 32), (64, 64), (48, 80)]) == (64, 64)


@pytest.mark.parametrize("orig", [(1000, 2000), (3000, 3000), (777, 1234), (600, 401), (2048, 512)])
@pytest.mark.parametrize("mode", ["center", "random"])
def test_crop_box_covers_the_bucket_and_stays_inside_the_image(orig, mode):
    orig_h, orig_w = orig
    bucket = assign_bucket(orig_h, orig_w, make_buckets(512))
    box = plan_crop(orig_h, orig_w, bucket, mode, random.Random(0))
    assert (box.height, box.width) == bucket
    assert box.resized_h >= bucket[0] and box.resized_w >= bucket[1]
    assert 0 <= box.top <= box.resized_h - box.height
    assert 0 <= box.left <= box.resized_w - box.width
    # Uniform scaling: the aspect ratio is kept (up to the rounding up of one side).
    assert box.resized_w / box.resized_h == pytest.approx(orig_w / orig_h, rel=0.01)

    left, top, right, bottom = box.to_original(orig_h, orig_w)
    assert 0 <= left < right <= orig_w + 1e-6 and 0 <= top < bottom <= orig_h + 1e-6


def test_center_crop_is_centered():
    box = plan_crop(1000, 2000, (512, 512), "center")
    assert (box.resized_h, box.resized_w) == (512, 1024)
    assert (box.top, box.left) == (0, 256)
    assert box.to_original(1000, 2000) == pytest.approx((500.0, 0.0, 1500.0, 1000.0))


def test_random_crop_is_reproducible_with_a_seeded_rng():
    boxes = [plan_crop(1000, 3000, (512, 512), "random", random.Random(42)) for _ in range(2)]
    assert boxes[0] == boxes[1]
    lefts = {plan_crop(1000, 3000, (512, 512), "random", random.Random(seed)).left for seed in range(20)}
    assert len(lefts) > 1  # and it really is random across seeds


def test_resized_size_is_rounded_up_so_it_always_covers():
    # 1023 × 0.500489... is not an integer; rounding down would leave the crop one pixel short.
    box = plan_crop(1023, 4000, (512, 512), "center")
    assert box.resized_h == 512 and box.resized_w == math.ceil(4000 * 512 / 1023)


def test_unknown_crop_mode_is_refused():
    with pytest.raises(ValueError, match="center"):
        plan_crop(100, 100, (64, 64), "middle")


def test_resize_and_crop_outputs_exactly_the_bucket():
    image = Image.new("RGB", (301, 157), (10, 200, 30))  # PIL size is (width, height)
    bucket = assign_bucket(157, 301, make_buckets(128))
    out = resize_and_crop(image, plan_crop(157, 301, bucket, "center"))
    assert out.size == (bucket[1], bucket[0])
    assert out.getpixel((0, 0)) == (10, 200, 30)


def test_center_crop_keeps_the_middle_of_the_image():
    # Left third red, middle green, right third blue: a square center crop of a 3:1 image is all green.
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))
    image.paste((0, 0, 255), (200, 0, 300, 100))
    out = resize_and_crop(image, plan_crop(100, 300, (64, 64), "center"))
    assert out.getpixel((32, 32)) == (0, 255, 0)


def test_upscale_factor_says_how_much_an_image_must_grow():
    assert upscale_factor(512, 512, (1024, 1024)) == 2.0
    assert upscale_factor(2048, 1024, (1024, 1024)) == 1.0  # the narrow side decides
    assert upscale_factor(4000, 4000, (1024, 1024)) < 1.0  # only shrinks
