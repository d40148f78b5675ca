"""The page at ``/`` of ``modcl serve`` in headless Chromium (Selenium + chromedriver, installed by ``.ci/run``):
pick a task, choose an image, see the top classes the API gives; a screenshot is saved in the test's tmp dir."""
import shutil

import httpx
import pytest

from test_serve import IMAGES, files, make_adapters, serve


def _chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    binary = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
    driver = shutil.which('chromedriver')
    if not binary or not driver:  # not a skip: .ci/run installs both, a missing browser is a broken setup
        pytest.fail('headless Chromium and chromedriver are needed (apt-get install -y chromium chromium-driver, '
                    'as .ci/run does)')
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--window-size=900,900',
              '--no-first-run', '--disable-extensions', '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1'):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.slow
def test_page_picks_a_task_and_shows_top_classes(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    folder = make_adapters(tmp_path / 'adapters', {'cats': 3, 'dogs': 4})
    image = tmp_path / 'photo.png'
    image.write_bytes(IMAGES[2])
    with serve(folder) as s:
        want = httpx.post(f'{s.url}/v1/tasks/dogs/predict?topk=5', files=files(IMAGES[2]), timeout=60).json()
        want_any = httpx.post(f'{s.url}/v1/predict?topk=5', files=files(IMAGES[2]), timeout=60).json()
        browser = _chrome()
        try:
            browser.set_page_load_timeout(60)
            browser.get(s.url + '/')
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.TAG_NAME, 'body').get_attribute('data-tasks') == '2')
            Select(browser.find_element(By.ID, 'task')).select_by_value('dogs')
            browser.find_element(By.ID, 'file').send_keys(str(image))
            wait.until(lambda b: b.find_element(By.TAG_NAME, 'body').get_attribute('data-done'))
            assert browser.find_element(By.TAG_NAME, 'body').get_attribute('data-done') == '1', \
                browser.find_element(By.ID, 'error').text
            shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, '#result td.cls')]
            assert shown == [c['name'] for c in want['predictions'][0]['top']] and len(shown) == 4
            assert 'task dogs (v1)' in browser.find_element(By.ID, 'status').text
            shot = tmp_path / 'serve_page.png'
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
            # no task picked: the page asks again for the same image, the server chooses the task and the page
            # says which
            browser.execute_script("document.body.dataset.done = '';")
            Select(browser.find_element(By.ID, 'task')).select_by_value('')
            wait.until(lambda b: b.find_element(By.TAG_NAME, 'body').get_attribute('data-done'))
            chosen = want_any['predictions'][0]['task']
            assert f'task {chosen} (v1), chosen with probability' in browser.find_element(By.ID, 'status').text
            shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, '#result td.cls')]
            assert shown == [c['name'] for c in want_any['predictions'][0]['top']]
            browser.save_screenshot(str(tmp_path / 'serve_page_any.png'))
            # the page loaded nothing from outside 127.0.0.1
            urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            assert urls and all(u.startswith(s.url) or u.startswith('blob:') for u in urls), urls
        finally:
            browser.quit()
